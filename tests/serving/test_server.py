"""The `steerlm` ensemble on a real tritonserver: protocols, streaming, steering, stops, batching, errors."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from steerlm.tokenize import load_tokenizer
from steerlm_client import SteerClient, SteerError
from tests.serving.grpc_stream import stream_infer

QUESTION = "Where and when did techno music originate?"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
# The SteerLM format (NVIDIA/NeMo-Aligner docs/user-guide/steerlm.rst) written out by hand
# (HelpSteer order; attributes left out take the model's defaults).
PROMPT = (
    "<extra_id_0>System\n" + SYSTEM + "\n"
    "<extra_id_1>User\n" + QUESTION + "\n"
    "<extra_id_1>Assistant\n"
    "<extra_id_2>quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,"
    "verbosity:4\n"
)


def test_prompt_output_matches_the_reference_format_byte_for_byte(client):
    assert client.complete(QUESTION, attributes={"verbosity": 4}, max_tokens=4).prompt == PROMPT


def test_attributes_reach_the_rendered_prompt(client):
    prompt = client.complete(QUESTION, attributes="creativity:3,verbosity:1", max_tokens=2).prompt
    assert prompt.endswith("<extra_id_2>quality:4,toxicity:0,humor:0,creativity:3,helpfulness:4,correctness:4,"
                           "coherence:4,complexity:4,verbosity:1\n")


def test_system_prompt_and_history_render_as_multi_turn(client):
    history = [{"question": "Hi!", "answer": "Hello, how can I help?", "attributes": {"verbosity": 1}}]
    prompt = client.complete("Tell me about techno.", system="Be brief.", history=history, max_tokens=2).prompt
    labels = "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,"
    assert prompt == (
        "<extra_id_0>System\nBe brief.\n"
        "<extra_id_1>User\nHi!\n<extra_id_1>Assistant\n<extra_id_2>" + labels + "verbosity:1\nHello, how can I help?\n"
        "<extra_id_1>User\nTell me about techno.\n<extra_id_1>Assistant\n<extra_id_2>" + labels + "verbosity:4\n"
    )


def test_http_and_grpc_give_the_same_greedy_answer(server):
    grpc = SteerClient(server.grpc_url, "grpc").generate(QUESTION, max_tokens=24)
    http = SteerClient(server.http_url, "http").generate(QUESTION, max_tokens=24)
    assert grpc and grpc == http


def test_streamed_pieces_concatenate_to_the_whole_answer(client):
    whole = client.generate(QUESTION, attributes={"verbosity": 4}, max_tokens=32)
    stream = client.stream(QUESTION, attributes={"verbosity": 4}, max_tokens=32)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == whole
    assert stream.prompt == PROMPT


def test_sampling_with_the_same_seed_repeats_streamed_or_whole(grpc_client):
    args = dict(max_tokens=24, temperature=1.0, top_k=50, seed=1234)
    whole = grpc_client.generate(QUESTION, **args)
    assert "".join(grpc_client.stream(QUESTION, **args)) == whole


def _stop_from(tok, answer: str) -> str:
    """A stop string from the middle of `answer` that is several tokens long."""
    for start in range(len(answer) // 3, len(answer) - 6):
        stop = answer[start : start + 6]
        if "\ufffd" not in stop and len(tok.encode(stop, add_special_tokens=False).ids) >= 2:
            return stop
    pytest.fail(f"no multi-token stop string in {answer!r}")


def test_stop_word_spanning_tokens_ends_the_answer_and_never_shows(client, tiny_model):
    answer = client.generate(QUESTION, max_tokens=40)
    stop = _stop_from(load_tokenizer(tiny_model), answer)
    expected = answer[: answer.index(stop)]
    assert client.generate(QUESTION, max_tokens=40, stop_words=[stop]) == expected
    pieces = list(client.stream(QUESTION, max_tokens=40, stop_words=["unrelated", stop]))
    assert "".join(pieces) == expected
    assert not any(stop in p for p in pieces)


def test_concurrent_requests_are_answered_as_if_sent_alone(server):
    jobs = [(f"Question number {i}: why is the sky blue?", 12 + 4 * i, "grpc" if i % 2 else "http", i % 3 == 0)
            for i in range(6)]

    def run(question, max_tokens, protocol, stream):
        client = SteerClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol)
        if stream:
            return "".join(client.stream(question, max_tokens=max_tokens))
        return client.generate(question, max_tokens=max_tokens)

    alone = [run(*job) for job in jobs]
    together: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()
        together[i] = run(*jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone
    assert len(set(alone)) == len(alone)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(attributes="funniness:3"), r"unknown attribute 'funniness'.*verbosity"),
        (dict(attributes={"verbosity": 9}), r"verbosity.*9.*0\.\.4"),
        (dict(history="[{not json"), r"history is not valid JSON"),
    ],
)
def test_bad_request_fails_alone_with_a_clear_error(client, kwargs, pattern):
    with pytest.raises(SteerError, match=pattern):
        client.generate(QUESTION, max_tokens=4, **kwargs)
    assert client.generate(QUESTION, max_tokens=4)  # the server keeps serving


def test_missing_max_tokens_is_named(server):
    import tritonclient.grpc as grpcclient

    from steerlm_client.client import _grpc_input

    errors = []
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: errors.append(error))
    client.async_stream_infer("steerlm", [_grpc_input(grpcclient, "text_input", QUESTION)])
    client.stop_stream()
    client.close()
    assert errors and errors[0] is not None and "max_tokens" in str(errors[0])
    assert SteerClient(server.grpc_url).generate(QUESTION, max_tokens=4)


def test_stock_tensorrtllm_backend_clients_work_over_http_generate(server):
    """tensorrtllm_backend's documented request: POST /v2/models/<ensemble>/generate with the plain names."""
    import json
    import urllib.request

    body = {"text_input": QUESTION, "max_tokens": 16, "bad_words": "", "stop_words": ""}
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/steerlm/generate",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        doc = json.loads(r.read())
    assert doc["text_output"] == SteerClient(server.grpc_url).generate(QUESTION, max_tokens=16)
    assert re.match(r"<extra_id_0>System\n", doc["prompt"])


def grpc_error(server, **inputs) -> str:
    """The error of one request sent with exactly these numpy inputs (each [1, n])."""
    results = stream_infer(server.grpc_url, "steerlm", inputs)
    assert results and results[0][1] is not None, "the request was accepted"
    return str(results[0][1])


def _b(text: bytes):
    return np.array([[text]], dtype=np.object_)


BASE = {"text_input": _b(QUESTION.encode()), "max_tokens": np.array([[4]], dtype=np.int32)}
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("inputs, expected", [
    (dict(temperature=np.array([[np.nan]], np.float32)), "temperature must be a finite number >= 0, got nan"),
    (dict(temperature=np.array([[np.inf]], np.float32)), "temperature must be a finite number"),  # 1e39 as FP32
    (dict(top_p=np.array([[1.5]], np.float32)), "top_p must be in (0, 1]"),
    (dict(top_k=np.array([[-5]], np.int32)), "top_k must be an integer >= 0"),
    (dict(presence_penalty=np.array([[np.inf]], np.float32)), "presence_penalty must be a finite number"),
    (dict(max_tokens=np.array([[-2147483648]], np.int32)), "max_tokens must be an integer >= 1"),
    (dict(min_tokens=np.array([[9]], np.int32)), "min_tokens must be an integer in 0..max_tokens (4)"),
    (dict(text_input=_b(b"caf\xff")), "text_input is not valid UTF-8"),
    (dict(text_input=_b("lone \ud800".encode("utf-8", "surrogatepass"))), "text_input is not valid UTF-8"),
    (dict(system=_b(b"\xc3")), "system is not valid UTF-8"),
    (dict(history=_b(b'[{"question": "a", "answer": "b", "labels": 5}]')), "history[0].labels must be a label string"),
    (dict(history=_b(b'[{"question": "a", "answer": "b", "attributes": [1]}]')), "history[0].attributes must be"),
    (dict(history=_b(b'[{"question": "a", "answer": 7}]')), "history[0].answer must be a string"),
    (dict(history=_b(b'["a"]')), "history[0] must be an object"),
    (dict(history=_b(DEEP.encode())), "history is nested too deeply"),
    (dict(end_id=np.array([[10**6]], np.int32)), "end_id must be a token id in 0.."),
])
def test_every_rejection_names_the_field_and_leaks_no_internals(server, inputs, expected):
    message = grpc_error(server, **(BASE | inputs))
    assert expected in message
    assert "Traceback" not in message and 'File "' not in message and "/steerlm/" not in message
    assert SteerClient(server.grpc_url).generate(QUESTION, max_tokens=2)  # the server keeps serving


def test_an_unsendable_http_body_is_refused_by_triton_without_internals(server):
    """Type errors in HTTP JSON (text_input as a number) are caught by Triton's own parser, before any model:
    the message is Triton's, without a stack frame or path; the SteerLM OpenAI API validates these by name."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{server.http_url}/v2/models/steerlm/generate",
                                 data=json.dumps({"text_input": 5, "max_tokens": 4}).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    body = err.value.read().decode()
    assert err.value.code >= 400 and "JSON" in body and "Traceback" not in body and "/steerlm/" not in body


def test_the_client_sends_min_tokens_and_penalties_as_upstreams_inputs(client):
    with pytest.raises(SteerError, match="min_tokens"):
        client.complete("hello", max_tokens=4, min_tokens=9)
    with pytest.raises(SteerError, match="presence_penalty"):
        client.complete("hello", max_tokens=4, presence_penalty=float("nan"))
    pieces = list(client.stream("hello", max_tokens=4, min_tokens=4, repetition_penalty=1.2))
    assert "".join(pieces)
