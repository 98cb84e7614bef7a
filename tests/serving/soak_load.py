"""`make soak`: what takes long or depends on Triton's timing (not collected by `make test`: no test_ prefix).

    SOAK_REQUESTS=5000 python -m pytest -q -s tests/serving/soak_load.py
    SOAK_CANCELS=10 python -m pytest -q -s tests/serving/soak_load.py -k cancel   # the cancellation table only

- the mixed load of test_resilience.py, longer;
- cancellation of an 800-token request, SOAK_CANCELS times per kind, printed as a table. Each attempt starts
  and ends with the engine idle, so the engine's token counter read then is exact (it is exported every
  0.25 s, which a read right after the cancel would miss). The generator logs every request it drops as
  cancelled with the CLOCK_MONOTONIC time its row left the batch (steerlm.serve.generator.Cancelled), and
  CLOCK_MONOTONIC is system-wide, so latency = that time - the client's cancel time, exactly. Tokens after
  the cancel = tokens the request cost - responses the client had received (each response carries at least
  one token): an upper bound on the decode steps the row ran after the cancel.
- as a reference, the same gRPC and HTTP cancels sent to a bare decoupled python model that Triton calls
  directly (a probe streaming a response every 2 ms, on its own server): the floor for the `steerlm` relay,
  which is such a model and adds its poll interval (50 ms) and one hop over the generator's socket.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import pytest

from steerlm.serve.generator import Cancelled
from steerlm_client.load import run_load
from tests.serving.test_resilience import LONG, QUESTION, engine_work, stalling_client, start_stream

ATTEMPTS = int(os.environ.get("SOAK_CANCELS", "5"))


@dataclass
class Outcome:
    tokens: float  # engine tokens the request cost
    received: int  # responses the client had when it cancelled
    latency_ms: float | None  # cancel -> row left the batch; None: the engine never saw the cancel

    @property
    def after(self) -> float:
        return self.tokens - self.received


MEASURED: dict[str, list[Outcome]] = defaultdict(list)


def test_soak_mixed_load_none_lost(server):
    n = int(os.environ.get("SOAK_REQUESTS", "5000"))
    report = run_load(server.grpc_url, server.http_url, requests=n, concurrency=32, max_tokens=32, timeout=300)
    print(report.summary())
    assert report.lost == 0 and report.mismatched == 0 and len(report.latencies) == n


def measure(server, kind: str, start, cancel) -> Outcome:
    """Run one attempt: `start()` sends the request and returns a function telling how many responses arrived
    so far (-1 for a unary call: it answers nothing before its end); once three have (a unary call: after
    0.2 s), `cancel()`."""
    at = {}

    def attempt():
        received = start()
        deadline = time.monotonic() + 60
        while 0 <= received() < 3:
            assert time.monotonic() < deadline, "fewer than 3 responses"
            time.sleep(0.002)
        if received() < 0:
            time.sleep(0.2)
        at["count"], at["asked"] = max(received(), 0), time.monotonic()
        cancel()

    tokens, records = engine_work(server, attempt)
    assert len(records) <= 1, records
    outcome = Outcome(tokens, at["count"], (records[0].left_at - at["asked"]) * 1000 if records else None)
    MEASURED[kind].append(outcome)
    seen = f"{outcome.latency_ms:.0f} ms" if records else "never"
    print(f"{kind}: cancel seen {seen}; {outcome.after:.0f} tokens after the cancel ({tokens:.0f} in all)")
    return outcome


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
def test_cancel_a_grpc_stream(server, attempt):
    state = {}

    def start():
        state["client"], received = start_stream(server, f"soak-grpc-{attempt}")
        return lambda: len(received)

    def cancel():
        state["client"].stop_stream(cancel_requests=True)
        state["client"].close()

    measure(server, "grpc stream cancelled", start, cancel)


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
def test_kill_a_grpc_streaming_client(server, tmp_path, attempt):
    script = stalling_client(server, tmp_path / "client.py")
    procs = []

    def start():
        procs.append(subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True))
        lines = []

        def received():
            if len(lines) < 3:
                lines.append(procs[0].stdout.readline())  # the client prints a line per piece
            return len(lines)
        return received

    try:
        measure(server, "grpc client killed", start, lambda: procs[0].kill())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
def test_close_an_http_generate_stream(server, attempt):
    host, port = server.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def start():
        body = json.dumps({"text_input": QUESTION, "max_tokens": LONG, "stream": True})
        conn.request("POST", "/v2/models/steerlm/generate_stream", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        events = []

        def received():
            if len(events) < 3:
                line = response.fp.readline()
                if line.startswith(b"data:"):
                    events.append(line)
            return len(events)
        return received

    measure(server, "http stream closed", start, conn.close)


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
def test_cancel_a_grpc_unary_call(server, attempt):
    import tritonclient.grpc as grpcclient

    from steerlm_client.client import _grpc_input

    state = {}

    def start():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = [_grpc_input(grpcclient, k, v) for k, v in dict(text_input=QUESTION, max_tokens=LONG).items()]
        state["call"] = client.async_infer("steerlm_whole", inputs, callback=lambda result, error: None,
                                           request_id=f"soak-unary-{attempt}")
        return lambda: -1  # a unary call answers nothing before its end

    measure(server, "grpc unary cancelled", start, lambda: state["call"].cancel())


@pytest.fixture(scope="module")
def api(server, tiny_model):
    from steerlm.api import ApiServer
    from steerlm.serve.ipc import socket_path

    with ApiServer(tiny_model, server.grpc_url, cancel_socket=socket_path(server.repo_dir)) as api:
        yield api


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
def test_hang_up_on_an_api_stream(server, api, attempt):
    host, port = api.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)  # closing it is the hang-up

    def start():
        body = json.dumps({"model": "steerlm", "stream": True, "max_tokens": LONG, "temperature": 0,
                           "messages": [{"role": "user", "content": QUESTION}]})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        chunks = []

        def received():
            if len(chunks) < 3:
                line = response.fp.readline()
                if line.startswith(b"data:") and b'"content":' in line:
                    chunks.append(line)
            return len(chunks)
        return received

    outcome = measure(server, "api stream closed", start, conn.close)
    assert outcome.latency_ms is not None, "the API's cancel over the generator's socket did not arrive"


def test_a_stop_string_ends_the_row(server):
    """Steps after the stop string appears: tokens the stopped request cost - the fewest tokens whose text
    contains the stop string (greedy, so the same tokens every time)."""
    from steerlm_client import SteerClient

    client = SteerClient(server.grpc_url)
    answer = client.generate(QUESTION, max_tokens=60)
    stop = answer[len(answer) // 2: len(answer) // 2 + 3]
    low, high = 1, 60
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if stop in client.generate(QUESTION, max_tokens=mid) else (mid + 1, high)
    answers = []
    for _ in range(ATTEMPTS):
        tokens, _ = engine_work(server, lambda: answers.append(client.generate(QUESTION, max_tokens=LONG,
                                                                                stop_words=[stop])))
        assert answers[-1] == answer[: answer.index(stop)]
        MEASURED["stop string in text"].append(Outcome(tokens, low, None))
        print(f"stop string: {tokens - low:.0f} tokens after the one that completed it")


# What the same clients do to a bare decoupled python model that Triton calls directly: what the `steerlm`
# relay (such a model) gets from Triton, without its poll interval and its hop to the generator.
PROBE_CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input", data_type: TYPE_STRING, dims: [ -1 ] } ]
output [ { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
PROBE_MODEL = """import threading, time
import numpy as np
import triton_python_backend_utils as pb_utils
from steerlm.serve.generator import Cancelled

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self.run, args=(request.get_response_sender(),), daemon=True).start()

    def run(self, sender):  # a response every 2 ms, like a decode step
        for i in range(%d):
            if sender.is_cancelled():
                pb_utils.Logger.log_info(Cancelled("", "client", i, time.monotonic()).log_line())
                break
            out = pb_utils.Tensor("text_output", np.array([b"x"], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            time.sleep(0.002)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
""" % LONG


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    from steerlm.serve import TritonServer

    repo = tmp_path_factory.mktemp("probe") / "models"
    (repo / "probe" / "1").mkdir(parents=True)
    (repo / "probe" / "config.pbtxt").write_text(PROBE_CONFIG)
    (repo / "probe" / "1" / "model.py").write_text(PROBE_MODEL)
    with TritonServer(repo_dir=repo) as srv:
        yield srv


def _probe_grpc(probe):
    import numpy as np
    import tritonclient.grpc as grpcclient

    received = []
    client = grpcclient.InferenceServerClient(probe.grpc_url)
    client.start_stream(callback=lambda result, error: received.append(error))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"q"], dtype=np.object_))
    client.async_stream_infer("probe", [text])
    while len(received) < 3:
        time.sleep(0.002)

    def cancel():
        client.stop_stream(cancel_requests=True)
        client.close()
    return len(received), cancel


def _probe_http(probe):
    host, port = probe.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v2/models/probe/generate_stream", json.dumps({"text_input": "q"}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    events = 0
    while events < 3:
        events += response.fp.readline().startswith(b"data:")
    return events, conn.close


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
@pytest.mark.parametrize("kind, start", [("grpc stream cancelled", _probe_grpc), ("http stream closed", _probe_http)])
def test_reference_cancel_reaches_a_directly_called_decoupled_model(probe, kind, start, attempt):
    at = probe.log_path.stat().st_size
    count, cancel = start(probe)
    asked = time.monotonic()
    cancel()
    deadline = time.monotonic() + 30
    while not (records := Cancelled.from_log(probe.log_path.read_text(errors="replace")[at:])):
        assert time.monotonic() < deadline, "the directly called model never saw the cancel"
        time.sleep(0.05)
    outcome = Outcome(records[0].tokens, count, (records[0].left_at - asked) * 1000)
    MEASURED[f"reference, bare model: {kind}"].append(outcome)
    print(f"reference {kind}: cancel seen {outcome.latency_ms:.0f} ms; {outcome.after} responses after it")


def _spread(values: list[float], fmt: str) -> str:
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values))) if values else "-"


def test_cancellation_table():
    """The figures of docs/serving.md "Cancellation", from this run."""
    print(f"\ncancellation of a {LONG}-token request ({ATTEMPTS} attempts per kind; min/median/max)")
    print(f"{'kind':48} {'engine saw it':>13} {'latency ms':>18} {'tokens after':>16}")
    for kind, outcomes in MEASURED.items():
        seen = [o.latency_ms for o in outcomes if o.latency_ms is not None]
        arrived = "-" if kind.startswith("stop") else f"{len(seen)}/{len(outcomes)}"
        print(f"{kind:48} {arrived:>13} {_spread(seen, '{:.1f}'):>18} "
              f"{_spread([o.after for o in outcomes], '{:.0f}'):>16}")
    print("engine saw it: the request was logged as cancelled. Triton 2.51 reports a streaming client's cancel to\n"
          "the `steerlm` relay it calls; it does not carry a unary caller's into the running steerlm_whole step\n"
          "(docs/serving.md \"Cancellation\")")
    assert MEASURED["api stream closed"] and MEASURED["stop string in text"]
    assert statistics.median(o.after for o in MEASURED["stop string in text"]) <= 2
    for kind in ("grpc stream cancelled", "grpc client killed", "http stream closed", "api stream closed"):
        if MEASURED[kind]:
            assert statistics.median(o.after for o in MEASURED[kind]) < LONG / 4, kind
