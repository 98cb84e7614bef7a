"""`make serve` (python -m steerlm.serve) and a hand-typed tritonserver, each queried with client/query.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steerlm_client import SteerClient, SteerError

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "Where and when did techno music originate?"
PROMPT_END = ("<extra_id_1>User\n" + QUESTION + "\n<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0,humor:0,"
              "creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4\n")


def query(*args) -> subprocess.CompletedProcess:
    """client/query.py run from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, "client/query.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 180) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail("server command ended early:\n" + "".join(lines) + proc.stderr.read())
        lines.append(line)
        if re.search(pattern, line):
            return lines
    pytest.fail(f"no line matching {pattern!r} in time:\n" + "".join(lines))


def test_serve_command_streams_answers_to_the_cli_client_and_stops_on_ctrl_c(tiny_model):
    proc = subprocess.Popen([sys.executable, "-m", "steerlm.serve", "--model", str(tiny_model), "--http-port", "0",
                             "--grpc-port", "0", "--metrics-port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        banner = "".join(wait_for_line(proc, "Ctrl-C stops the server"))
        grpc_url = re.search(r"gRPC\s+(\S+)", banner).group(1)
        http_url = re.search(r"HTTP\s+http://(\S+)", banner).group(1)
        streamed = query(QUESTION, "--attr", "verbosity=4", "--stream", "--url", grpc_url, "--max-tokens", "16")
        assert streamed.returncode == 0, streamed.stderr
        whole = query(QUESTION, "--attr", "verbosity=4", "--print-prompt", "--protocol", "http", "--url", http_url,
                      "--max-tokens", "16")
        assert whole.returncode == 0, whole.stderr
        assert whole.stdout.startswith("<extra_id_0>System\n") and PROMPT_END in whole.stdout
        assert whole.stdout.split(PROMPT_END, 1)[1] == streamed.stdout
        bad = query(QUESTION, "--attr", "verbosity=7", "--url", grpc_url)
        assert bad.returncode == 1 and "verbosity" in bad.stderr and "0..4" in bad.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
    with pytest.raises(SteerError):  # the server is gone: "cannot reach ..."
        SteerClient(http_url, "http", timeout=5).generate(QUESTION, max_tokens=1)


def test_rendered_repository_serves_from_a_hand_typed_tritonserver_command(tiny_model, tmp_path):
    dry = subprocess.run([sys.executable, "-m", "steerlm.serve", "--model", str(tiny_model), "--repo-dir",
                          str(tmp_path / "repo"), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    command = dry.stdout.splitlines()[-1].strip()
    assert "tritonserver" in command and f"--model-repository={(tmp_path / 'repo').resolve()}" in command
    grpc_url = "127.0.0.1:" + re.search(r"--grpc-port=(\d+)", command).group(1)
    # As typed into a shell; its own process group, so that the server and its python stubs stop together.
    server = subprocess.Popen(["bash", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            answer = query(QUESTION, "--url", grpc_url, "--max-tokens", "8", "--print-prompt")
            if answer.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(1)
        assert answer.returncode == 0, answer.stderr
        assert PROMPT_END in answer.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _serve(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "steerlm.serve", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _children(pid: int) -> dict[int, str]:
    from steerlm.serve.triton import process_children

    return process_children(pid)


def test_a_killed_generator_process_stops_the_server_with_the_cause(tiny_model):
    """Triton keeps reporting ready when a python model's process dies; `make serve` must not."""
    proc = _serve("--model", tiny_model, "--http-port", 0, "--grpc-port", 0, "--metrics-port", 0)
    try:
        banner = "".join(wait_for_line(proc, "Ctrl-C stops the server"))
        log = re.search(r"log (\S+)", banner).group(1)
        (server_pid,) = [p for p, cmd in _children(proc.pid).items() if "tritonserver" in cmd]
        (stub,) = [p for p, cmd in _children(server_pid).items() if "/generator/1/model.py" in cmd]
        os.kill(stub, signal.SIGKILL)
        code = proc.wait(60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 1
    assert f"the process of model 'generator' (PID {stub}) died (killed or crashed); log: {log}" in err
    assert not Path(re.search(r"repository (\S+)", banner).group(1)).exists()  # the temporary repository
    assert Path(log).is_file()  # kept, for the cause
    Path(log).unlink()


def test_streams_open_when_the_generator_dies_end_with_the_cause(tiny_model, tmp_path):
    """The `steerlm` relay outlives the generator's process: its open streams and the requests after them are
    answered with why, never left waiting."""
    from steerlm.serve import TritonServer
    from steerlm.serve.relay import GENERATOR_GONE

    with TritonServer(tiny_model, workdir=tmp_path) as server:
        client = SteerClient(server.grpc_url)
        pieces = iter(client.stream(QUESTION, max_tokens=800))
        next(pieces)
        (stub,) = [pid for pid, name in server.stub_pids.items() if name == "generator"]
        os.kill(stub, signal.SIGKILL)
        with pytest.raises(SteerError, match=re.escape(GENERATOR_GONE)):
            for _ in pieces:
                pass
        with pytest.raises(SteerError, match="generation unavailable: the generator is not reachable"):
            client.generate(QUESTION, max_tokens=4)
        assert "the process of model 'generator'" in (server.check_health() or "")


def test_a_busy_port_is_named_before_anything_starts(tiny_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "steerlm.serve", "--model", str(tiny_model), "--http-port", "0",
                              "--grpc-port", "0", "--metrics-port", str(port)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 1
    assert f"metrics port {port} is already in use on 127.0.0.1" in out.stderr


def test_ctrl_c_during_start_up_stops_at_once_and_leaves_nothing(tiny_model):
    proc = _serve("--model", tiny_model, "--http-port", 0, "--grpc-port", 0, "--metrics-port", 0)
    line = proc.stdout.readline()  # "rendered the cpu model repository into DIR": start-up has begun
    repo = Path(line.rsplit(" ", 1)[1].strip())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert not repo.parent.exists()


def test_a_model_that_cannot_load_is_summarized_in_one_line(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by an interrupted copy
    out = subprocess.run([sys.executable, "-m", "steerlm.serve", "--model", str(broken), "--http-port", "0",
                          "--grpc-port", "0", "--metrics-port", "0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    error = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "model 'generator' failed to load:" in error[0], out.stderr
    log = re.search(r"\(log: (\S+)\)$", error[0]).group(1)
    assert Path(log).is_file()
    Path(log).unlink()


def test_server_env_puts_this_interpreter_first_and_keeps_a_user_openmp_policy():
    from steerlm.serve.triton import server_env

    env = server_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": ""})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert server_env({"PATH": "", "OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
