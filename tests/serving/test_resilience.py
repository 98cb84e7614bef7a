"""The serving core under load and abuse, on a real tritonserver: nothing lost, bad requests fail alone,
cancellation reaches the engine, limits apply before work."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable

import numpy as np
import pytest

from steerlm.serve.generator import Cancelled
from steerlm_client import SteerClient, SteerError
from steerlm_client.load import run_load
from tests.serving.grpc_stream import stream_infer

QUESTION = "Where and when did techno music originate?"
LONG = 800  # tokens a cancelled request would otherwise generate (the tiny model's context is 1024)


def metric(server, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^{name}\{{model="generator"\}} (\S+)$', text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


EXPORT_INTERVAL = 0.25  # the generator exports its engine metrics this often (steerlm.serve.generator.Watchdog)


def wait_idle(server, timeout: float = 60) -> None:
    """Return once the engine has no work and its exported counters include everything it did. The metrics
    are a snapshot up to one export interval old: without the first wait, a request sent just now reads as
    no work at all."""
    time.sleep(2 * EXPORT_INTERVAL)
    deadline = time.monotonic() + timeout
    while metric(server, "steerlm_engine_pending") > 0:
        assert time.monotonic() < deadline, "the engine still has work"
        time.sleep(0.1)
    time.sleep(2 * EXPORT_INTERVAL)


def engine_work(server, action: Callable[[], object]) -> tuple[float, list[Cancelled]]:
    """Tokens the engine sampled while `action()` ran and what followed it, and the cancellations the generator
    logged meanwhile. Exact: the counter is read with the engine idle before and after."""
    wait_idle(server)
    before, log_at = metric(server, "steerlm_engine_tokens_total"), server.log_path.stat().st_size
    action()
    wait_idle(server)
    with open(server.log_path, errors="replace") as log:
        log.seek(log_at)
        records = Cancelled.from_log(log.read())
    return metric(server, "steerlm_engine_tokens_total") - before, records


def wait_for(received: list, n: int = 3, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(received) < n:
        assert time.monotonic() < deadline, f"fewer than {n} responses"
        time.sleep(0.002)


def start_stream(server, request_id: str, max_tokens: int = LONG):
    """A `steerlm` stream over gRPC: the tritonclient (to stop it) and the errors of the responses so far."""
    import tritonclient.grpc as grpcclient

    from steerlm_client.client import _grpc_input

    received: list = []
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: received.append(error))
    inputs = [_grpc_input(grpcclient, k, v) for k, v in
              dict(text_input=QUESTION, max_tokens=max_tokens, stream=True).items()]
    client.async_stream_infer("steerlm", inputs, request_id=request_id)
    return client, received


def test_a_cancelled_grpc_stream_leaves_the_engine(server):
    """Triton's gRPC frontend cancels the request it received (triton-inference-server/server r24.10 e0f0734d,
    src/grpc/infer_handler.h IssueRequestCancellation -> TRITONSERVER_InferenceRequestCancel), which is the
    `steerlm` relay's own: it sees its sender's is_cancelled() and closes its stream to the generator."""

    def cancel_after_three_responses():
        client, received = start_stream(server, "stream-cancel")
        wait_for(received)
        client.stop_stream(cancel_requests=True)
        client.close()

    tokens, cancelled = engine_work(server, cancel_after_three_responses)
    assert [(c.request_id, c.by) for c in cancelled] == [("stream-cancel", "client")]
    assert tokens < LONG / 2


def stalling_client(server, path):
    """A client program at `path` that streams a LONG answer over gRPC, prints a line per piece and stops
    reading after the third (then sleeps until killed)."""
    path.write_text(
        "import time\n"
        "from steerlm_client import SteerClient\n"
        f"pieces = SteerClient({server.grpc_url!r}).stream({QUESTION!r}, max_tokens={LONG})\n"
        "for i, _ in enumerate(pieces):\n"
        "    print(i + 1, flush=True)\n"
        "    if i == 2:\n"
        "        time.sleep(600)\n")
    return path


def test_a_killed_streaming_client_leaves_the_engine(server, tmp_path):
    script = stalling_client(server, tmp_path / "client.py")

    def kill_after_three_pieces():
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(3):
                assert proc.stdout.readline(), "the client ended before three pieces"
        finally:
            proc.kill()
            proc.wait()

    tokens, cancelled = engine_work(server, kill_after_three_pieces)
    assert [c.by for c in cancelled] == ["client"] and tokens < LONG / 2


def test_a_closed_http_generate_stream_leaves_the_engine(server):
    def close_after_three_events():
        host, port = server.http_url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = json.dumps({"text_input": QUESTION, "max_tokens": LONG, "stream": True})
        conn.request("POST", "/v2/models/steerlm/generate_stream", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        events = 0
        while events < 3:
            line = response.fp.readline()
            assert line, "the stream ended before three events"
            events += line.startswith(b"data:")
        conn.close()

    tokens, cancelled = engine_work(server, close_after_three_events)
    assert [c.by for c in cancelled] == ["client"] and tokens < LONG / 2


def test_1000_mixed_requests_from_32_clients_none_lost_streamed_equal_whole(server):
    report = run_load(server.grpc_url, server.http_url, requests=1000, concurrency=32, max_tokens=16, timeout=120)
    print(report.summary())
    assert report.lost == 0, report.errors[:5]
    assert report.mismatched == 0
    assert len(report.latencies) == 1000


def test_a_poisoned_request_fails_alone_next_to_healthy_ones(server):
    """temperature 1e39 is +inf as FP32; with a bad word it used to fail every request batched with it."""
    client = SteerClient(server.grpc_url)
    alone = client.generate(QUESTION, max_tokens=24)
    results: dict[int, object] = {}

    def ask(i):
        try:
            if i == 2:
                results[i] = client.generate(QUESTION, max_tokens=24, temperature=1e39, top_k=50, bad_words=["a b"])
            else:
                results[i] = "".join(client.stream(QUESTION, max_tokens=24)) if i % 2 else client.generate(
                    QUESTION, max_tokens=24)
        except SteerError as exc:
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert isinstance(results[2], SteerError) and "temperature" in str(results[2])
    assert [results[i] for i in (0, 1, 3, 4)] == [alone] * 4


def test_a_stop_string_seen_in_text_leaves_the_engine(server):
    client = SteerClient(server.grpc_url)
    answer = client.generate(QUESTION, max_tokens=40)
    stop = answer[10:13]
    tokens, _ = engine_work(server, lambda: client.generate(QUESTION, max_tokens=LONG, stop_words=[stop]))
    assert client.generate(QUESTION, max_tokens=LONG, stop_words=[stop]) == answer[: answer.index(stop)]
    assert tokens < 40


def test_an_oversize_input_is_refused_while_another_request_is_answered(server):
    client = SteerClient(server.grpc_url)
    other: list = []
    thread = threading.Thread(target=lambda: other.append(client.generate(QUESTION, max_tokens=32)))
    thread.start()
    with pytest.raises(SteerError, match=r"text_input is 8388608 bytes; this server takes at most 262144 bytes"):
        client.generate("x" * (8 << 20), max_tokens=4)
    thread.join(120)
    assert other and other[0]


def test_the_generator_refuses_requests_sent_to_it_through_triton(server):
    inputs = {"REQUEST": np.array([[b'{"input_ids": [1, 2, 3]}']], dtype=np.object_),
              "SIGNATURE": np.array([[b"0" * 64]], dtype=np.object_)}
    results = stream_infer(server.grpc_url, "generator", inputs)
    assert results and "the generator takes no requests of its own: send yours to steerlm" in str(results[0][1])


# tensorrtllm_backend inflight_batcher_llm/client/end_to_end_grpc_client.py (commit c2e65b88d852), prepare_inputs
# with its defaults: these tensors, model name "ensemble", requested output text_output only.
def upstream_inputs(prompt: str, output_len: int, streaming: bool) -> dict[str, np.ndarray]:
    return {
        "text_input": np.array([[prompt]]).astype(object),
        "max_tokens": np.ones_like([[prompt]]).astype(np.int32) * output_len,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32),
        "num_return_sequences": np.array([[1]], dtype=np.int32),
        "exclude_input_in_output": np.array([[False]], dtype=bool),
    }


@pytest.mark.parametrize("streaming", [False, True])
def test_upstream_end_to_end_grpc_client_tensors_are_answered_by_ensemble(server, streaming):
    results = stream_infer(server.grpc_url, "ensemble", upstream_inputs(QUESTION, 16, streaming), ["text_output"])
    assert all(e is None for _, e in results), results
    text = "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r, _ in results)
    whole = SteerClient(server.grpc_url).complete(QUESTION, max_tokens=16)
    # exclude_input_in_output=false: like the C++ backend, a whole answer repeats the prompt, a stream does not.
    assert text == (whole.text if streaming else whole.prompt + whole.text)


@pytest.mark.parametrize("inputs, message", [
    (dict(beam_width=4), "beam_width: only 1 is supported"),
    (dict(num_return_sequences=2), "num_return_sequences: only 1 is supported"),
])
def test_values_the_server_cannot_honour_are_refused_by_name(server, inputs, message):
    arrays = upstream_inputs(QUESTION, 4, False) | {k: np.array([[v]], dtype=np.int32) for k, v in inputs.items()}
    results = stream_infer(server.grpc_url, "ensemble", arrays)
    assert results and message in str(results[0][1])


def test_genai_perf_tensorrtllm_payload_is_answered_with_its_exact_length(server):
    """genai-perf's tensorrtllm converter (perf_analyzer genai-perf/genai_perf/inputs/converters/
    tensorrtllm_converter.py, commit ceccbfa04026) with --output-tokens-mean-deterministic sends text_input,
    max_tokens, stream and min_length = max_tokens, and counts the tokens it gets back."""
    payload = {"text_input": np.array([[QUESTION]], dtype=object), "max_tokens": np.array([[24]], dtype=np.int32),
               "stream": np.array([[True]]), "min_length": np.array([[24]], dtype=np.int32),
               "return_num_output_tokens": np.array([[True]])}
    results = stream_infer(server.grpc_url, "ensemble", payload)
    assert all(e is None for _, e in results), results
    counts = [r.as_numpy("num_output_tokens") for r, _ in results if r.as_numpy("num_output_tokens") is not None]
    assert [int(c.reshape(-1)[0]) for c in counts] == [24]
    assert results[-1][0].as_numpy("finish_reason").reshape(-1)[0] == b"length"
