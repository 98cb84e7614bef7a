"""Faults the soak harness injects into real processes: each returns a FaultResult (injected?, reported?,
items lost, what was seen). "Injected" is False when the process finished before the kill landed; the
caller retries or counts it as not injected, never as a pass."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


@dataclass
class FaultResult:
    fault: str
    injected: bool
    lost: int  # items a client or user loses that a clean state would have kept
    note: str


def _wait(cond, proc: subprocess.Popen | None, timeout: float, poll: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(cond())
        time.sleep(poll)
    return False


def kill_generator_mid_load(model: Path) -> FaultResult:
    """SIGKILL the generator's stub process while 16 clients stream; `TritonServer.check_health` must name it,
    and once the server is stopped for it (as `make serve` does) every client must get an answer or an error.
    Lost: clients still waiting after that, plus 1 if the death went unreported."""
    from steerlm.serve import TritonServer
    from steerlm_client import SteerClient

    outcomes: list[str] = []
    started = threading.Event()

    def client(url: str, i: int) -> None:
        try:
            pieces = SteerClient(url).stream(f"Question {i}: tell me about techno.", max_tokens=400)
            for n, _ in enumerate(pieces):
                if n == 2:
                    started.set()
            outcomes.append("done")
        except Exception as exc:  # noqa: BLE001 - the client's view of the fault
            outcomes.append(f"error: {exc}")

    with TritonServer(model) as srv:
        threads = [threading.Thread(target=client, args=(srv.grpc_url, i), daemon=True) for i in range(16)]
        for t in threads:
            t.start()
        started.wait(120)
        (stub,) = [pid for pid, name in srv.stub_pids.items() if name == "generator"]
        os.kill(stub, signal.SIGKILL)
        _wait(lambda: srv.check_health() is not None, None, 60, 0.05)
        health = srv.check_health() or ""
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hanging = sum(t.is_alive() for t in threads)
    reported = f"the process of model 'generator' (PID {stub}) died" in health
    return FaultResult("generator stub killed mid-load", True, hanging + (not reported),
                       f"check_health: {health!r}; of 16 streams {outcomes.count('done')} finished, "
                       f"{len(outcomes) - outcomes.count('done')} got an error, {hanging} still waiting")


def kill_conversion_mid_write(model: Path, work: Path, attempts: int = 5) -> FaultResult:
    """SIGKILL build/convert_checkpoint.py while its hidden `.NAME.partial-*` output exists, then rerun: no
    partial may remain and the output must be absent or verify against the model."""
    out = work / "ckpt"
    cmd = [sys.executable, str(ROOT / "build" / "convert_checkpoint.py"), "--model_dir", str(model), "--output_dir",
           str(out), "--tp_size", "4", "--dtype", "float32"]
    injected = False
    for _ in range(attempts):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        hit = _wait(lambda: any(work.glob(f".{out.name}.partial-*")), proc, 300, poll=0.001)
        proc.kill()
        proc.wait()
        if hit and not out.exists():
            injected = True
            break
        shutil.rmtree(out, ignore_errors=True)
    left_by_kill = [p.name for p in work.glob(f".{out.name}.*")]
    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    partials = [p.name for p in work.glob(f".{out.name}.*")]
    lost = len(partials)
    if out.exists():
        ok = subprocess.run([sys.executable, str(ROOT / "build" / "verify_checkpoint.py"), "--checkpoint_dir",
                             str(out), "--model_dir", str(model)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=600)
        lost += ok.returncode != 0
    else:
        lost += rerun.returncode == 0  # a run that succeeded must leave its output
    return FaultResult("conversion killed mid-write", injected, lost,
                       f"kill left {left_by_kill}; rerun exit {rerun.returncode}, hidden entries after: {partials}")


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def kill_sft_after_checkpoint(model: Path, data: Path, work: Path, steps: int = 6) -> FaultResult:
    """SIGKILL `python -m steer_train sft` right after its step-2 checkpoint, resume with the same command, and
    compare with an uninterrupted run: lost = optimizer steps missing or repeated in metrics.jsonl, plus steps
    whose loss differs from the uninterrupted run's, plus a missing final model."""
    args = ["--model", str(model), "--data", str(data), "--seq-len", "192", "--micro-batch", "1", "--lr", "3e-3",
            "--max-steps", str(steps), "--warmup", "2", "--save-every", "2", "--no-progress", "--device", "cpu"]

    def run(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "steer_train", "sft", *args, "--out", str(out)], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=900)

    straight = work / "straight"
    assert run(straight).returncode == 0
    out = work / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "steer_train", "sft", *args, "--out", str(out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "step-0000002" / "state.json"
    _wait(marker.exists, proc, 600, poll=0.005)
    proc.kill()
    proc.wait()
    injected = marker.exists() and not (out / "steerlm.json").exists()
    resumed = run(out)
    steps_seen = _steps(out) if (out / "metrics.jsonl").exists() else []
    lost = len(set(range(1, steps + 1)) - set(steps_seen)) + (len(steps_seen) - len(set(steps_seen)))
    if len(steps_seen) == steps:
        lost += sum(abs(a - b) > 1e-5 for a, b in zip(_losses(out), _losses(straight), strict=True))
    lost += not (out / "model.safetensors").is_file()
    resumed_from = re.search(r"resuming from .* at step (\d+)", resumed.stdout)
    return FaultResult("sft killed after its step-2 checkpoint", injected, lost,
                       f"resume exit {resumed.returncode}, "
                       f"{'resumed at step ' + resumed_from.group(1) if resumed_from else 'did not resume'}, "
                       f"steps logged {steps_seen}")


def kill_serve_during_start_up(model: Path, sig: int = signal.SIGTERM) -> FaultResult:
    """Signal `python -m steerlm.serve` once it has rendered its temporary repository and before it is ready:
    it must exit promptly and remove the temporary directory (lost = directories left behind)."""
    proc = subprocess.Popen([sys.executable, "-m", "steerlm.serve", "--model", str(model), "--http-port", "0",
                             "--grpc-port", "0", "--metrics-port", "0"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "rendered the cpu model repository into DIR"
        repo = Path(line.rsplit(" ", 1)[1].strip()) if "repository into" in line else None
        ready = False
        proc.send_signal(sig)
        code = proc.wait(90)
        rest = proc.stdout.read()
        ready = "Ctrl-C stops the server" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = 1 if repo is None or repo.parent.exists() else 0
    name = signal.Signals(sig).name
    return FaultResult(f"serve got {name} during start-up", repo is not None and not ready, left,
                       f"exit {code}, temporary {repo.parent if repo else '?'} "
                       f"{'left behind' if left else 'removed'}")
