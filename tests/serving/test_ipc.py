"""The generator's local channel (steerlm.serve.ipc) without Triton: a real GeneratorCore on a temp socket."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
import uuid

import pytest

from steerlm.generation import Engine
from steerlm.serve.generator import GeneratorCore
from steerlm.serve.ipc import (
    IpcClient,
    IpcError,
    IpcServer,
    recv_message,
    send_message,
    socket_path,
)
from steerlm.serve.requests import RequestBuilder
from steerlm.spec import load_spec
from steerlm.tokenize import load_tokenizer

KEY = b"i" * 32
QUESTION = "Where and when did techno music originate?"


class EndlessEngine:
    """Emits one token per step until cancelled or max_tokens; counts steps run after a cancel was asked."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.steps = 0
        self.started = threading.Event()

    def submit(self, request) -> None:
        def run() -> None:
            self.started.set()
            for n in range(request.params.max_tokens):
                if request.cancelled():
                    return
                self.steps += 1
                time.sleep(0.01)
                request.emit([self.token], n + 1 == request.params.max_tokens)

        threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def builder(tiny_model):
    return RequestBuilder(tiny_model)


@pytest.fixture(scope="module")
def real_core(tiny_model):
    engine = Engine(tiny_model, max_batch_size=4)
    yield GeneratorCore(engine, load_tokenizer(tiny_model), load_spec(tiny_model).template.answer_end, KEY)
    engine.close()


def serve(core, tmp_path):
    return IpcServer(core, socket_path(tmp_path / "repo"))


def test_a_signed_request_gets_its_whole_answer_as_the_ensemble_would_give_it(real_core, builder, tmp_path):
    from tests.serving.test_generator import FakeSink

    prepared = builder.build(QUESTION, 16, return_num_input_tokens=True, return_num_output_tokens=True)
    server = serve(real_core, tmp_path)
    try:
        with IpcClient(server.path, timeout=60) as client:
            result = client.submit(*prepared.to_wire(KEY))
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
    finally:
        server.close()
    again = FakeSink()
    real_core.submit(*prepared.to_wire(KEY), again)
    assert result.text == again.wait().text() and result.text
    assert result.prompt == prepared.prompt
    assert result.finish_reason == again.last()["finish_reason"][0, 0].decode()
    assert result.num_input_tokens == len(prepared.input_ids) and result.num_output_tokens == 16


def test_a_document_not_signed_with_the_repository_key_is_refused_with_the_reason(real_core, builder, tmp_path):
    server = serve(real_core, tmp_path)
    try:
        document, _ = builder.build(QUESTION, 4).to_wire(KEY)
        _, forged = builder.build(QUESTION, 4).to_wire(b"x" * 32)
        with IpcClient(server.path, timeout=60) as client:
            with pytest.raises(IpcError, match="steerlm ensemble only"):
                client.submit(document, forged)
            assert client.submit(*builder.build(QUESTION, 2).to_wire(KEY)).text  # the connection still serves
    finally:
        server.close()


def test_cancel_by_request_id_ends_the_request_in_the_engine_within_a_few_steps(tiny_model, builder, tmp_path):
    tokenizer = load_tokenizer(tiny_model)
    engine = EndlessEngine(token=tokenizer.encode("la", add_special_tokens=False).ids[0])
    core = GeneratorCore(engine, tokenizer, load_spec(tiny_model).template.answer_end, KEY)
    server = serve(core, tmp_path)
    request_id = uuid.uuid4().hex
    results: list = []
    try:
        asker = IpcClient(server.path, timeout=60)
        prepared = builder.build(QUESTION, 200)
        waiter = threading.Thread(target=lambda: results.append(asker.submit(*prepared.to_wire(KEY), request_id)))
        waiter.start()
        assert engine.started.wait(30)
        with IpcClient(server.path, timeout=60) as other:
            assert other.cancel(request_id) is True
            at_cancel = engine.steps
            assert other.cancel("no-such-request") is False
        waiter.join(60)
        asker.close()
    finally:
        server.close()
    assert results and results[0].finish_reason == "cancelled"
    assert engine.steps - at_cancel <= 3 and engine.steps < 200


def test_a_caller_that_goes_away_cancels_its_request(tiny_model, builder, tmp_path):
    tokenizer = load_tokenizer(tiny_model)
    engine = EndlessEngine(token=tokenizer.encode("la", add_special_tokens=False).ids[0])
    core = GeneratorCore(engine, tokenizer, load_spec(tiny_model).template.answer_end, KEY)
    server = serve(core, tmp_path)
    try:
        asker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        asker.connect(str(server.path))
        document, signature = builder.build(QUESTION, 200).to_wire(KEY)
        send_message(asker, {"op": "submit", "id": "gone", "document": document.decode(), "signature": signature.decode()})
        assert engine.started.wait(30)
        asker.close()
        deadline = time.monotonic() + 60
        while server.cancel("gone") and time.monotonic() < deadline:  # still registered: not yet ended
            time.sleep(0.05)
        steps = engine.steps
        time.sleep(0.3)
    finally:
        server.close()
    assert engine.steps == steps < 200


def test_a_long_socket_path_works_and_a_malformed_message_does_not_stop_the_server(real_core, builder, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = IpcServer(real_core, socket_path(deep))
    assert len(str(server.path)) > 108
    try:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = os.open(deep / ".run", os.O_RDONLY)
        raw.connect(f"/proc/self/fd/{fd}/generator.sock")
        os.close(fd)
        with raw:
            send_message(raw, {"op": "explode"})
            assert "op must be one of" in recv_message(raw)["error"]
            raw.sendall(b"\x00\x00\x00\x03abc")
            assert "not JSON" in recv_message(raw)["error"]
        with IpcClient(server.path, timeout=60) as client:
            assert client.submit(*builder.build(QUESTION, 2).to_wire(KEY)).text
    finally:
        server.close()


def test_the_protocol_runs_on_a_socketpair(real_core, builder):
    left, right = socket.socketpair()
    server = IpcServer(real_core)
    threading.Thread(target=server.serve_connection, args=(right,), daemon=True).start()
    with IpcClient.from_socket(left) as client:
        result = client.submit(*builder.build(QUESTION, 4).to_wire(KEY))
    assert result.finish_reason in ("stop", "length") and result.prompt == builder.build(QUESTION, 4).prompt


def test_a_request_that_came_through_triton_is_cancelled_by_its_triton_request_id(tiny_model, builder, tmp_path):
    from tests.serving.test_generator import FakeSink

    tokenizer = load_tokenizer(tiny_model)
    engine = EndlessEngine(token=tokenizer.encode("la", add_special_tokens=False).ids[0])
    core = GeneratorCore(engine, tokenizer, load_spec(tiny_model).template.answer_end, KEY)
    server = serve(core, tmp_path)
    try:
        sink = FakeSink()  # the decoupled model's response sender
        core.submit(*builder.build(QUESTION, 200, stream=True).to_wire(KEY), sink, "triton-id-7")
        assert engine.started.wait(30)
        with IpcClient(server.path, timeout=60) as client:
            assert client.cancel("triton-id-7") is True
            at_cancel = engine.steps
            sink.wait()
            assert client.cancel("triton-id-7") is False  # ended: no longer indexed
    finally:
        server.close()
    assert sink.responses[-1] == (None, True, None)  # the stream ends like a client cancellation
    assert engine.steps - at_cancel <= 3


def test_a_cancel_that_arrives_before_its_request_still_ends_it(tiny_model, builder):
    from tests.serving.test_generator import FakeSink

    tokenizer = load_tokenizer(tiny_model)
    engine = EndlessEngine(token=tokenizer.encode("la", add_special_tokens=False).ids[0])
    core = GeneratorCore(engine, tokenizer, load_spec(tiny_model).template.answer_end, KEY)
    assert core.cancel("early-id") is False  # the request is still in preprocessing
    sink = FakeSink()
    core.submit(*builder.build(QUESTION, 200, stream=True).to_wire(KEY), sink, "early-id")
    sink.wait()
    assert engine.steps == 0 and sink.responses[-1] == (None, True, None)
