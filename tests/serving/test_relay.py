"""The `steerlm` relay (steerlm.serve.relay) and the generator's `stream` op, without Triton: fake response
senders, a real GeneratorCore behind an IpcServer on a socketpair or a temp socket.

Upstream tests its Triton model code the same way (tensorrtllm_backend all_models/tests/test_decode.py, with
mocks in place of pb_utils)."""

from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pytest

from steerlm.generation import Engine
from steerlm.serve.generator import Cancelled, GeneratorCore
from steerlm.serve.ipc import IpcClient, IpcError, IpcServer, recv_message, send_message, socket_path
from steerlm.serve.relay import GENERATOR_GONE, Relay
from steerlm.serve.requests import RequestBuilder
from steerlm.spec import load_spec
from steerlm.tokenize import load_tokenizer
from tests.serving.test_generator import FakeSink

KEY = b"r" * 32
QUESTION = "Where and when did techno music originate?"
LONG = 800  # tokens a cancelled request would otherwise run (the tiny model's context is 1024)


class CountingEngine:
    """One token per step until cancelled or max_tokens; `finished` is set when its loop has left the row."""

    def __init__(self, token: int, delay: float = 0.002) -> None:
        self.token, self.delay = token, delay
        self.steps = 0
        self.started = threading.Event()
        self.finished = threading.Event()

    def submit(self, request) -> None:
        def run() -> None:
            self.started.set()
            try:
                for n in range(request.params.max_tokens):
                    if request.cancelled():
                        return
                    self.steps += 1
                    threading.Event().wait(self.delay)
                    request.emit([self.token], n + 1 == request.params.max_tokens)
            finally:
                self.finished.set()

        threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        pass


def inputs(**values) -> dict[str, np.ndarray]:
    """Tensors as Triton hands them to the model: [1, 1] each, text as bytes."""
    out = {}
    for name, value in values.items():
        if isinstance(value, str):
            out[name] = np.array([[value.encode()]], dtype=np.object_)
        elif isinstance(value, list):
            out[name] = np.array([[v.encode() for v in value]], dtype=np.object_)
        else:
            out[name] = np.array([[value]])
    return out


@pytest.fixture(scope="module")
def builder(tiny_model):
    return RequestBuilder(tiny_model)


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = Engine(tiny_model, max_batch_size=4)
    yield eng
    eng.close()


def core_for(engine, tiny_model, **kwargs) -> GeneratorCore:
    return GeneratorCore(engine, load_tokenizer(tiny_model), load_spec(tiny_model).template.answer_end, KEY, **kwargs)


def paired(core: GeneratorCore):
    """A `connect` for Relay: each call serves a new socketpair with `core`'s IpcServer."""
    server = IpcServer(core)

    def connect() -> IpcClient:
        left, right = socket.socketpair()
        threading.Thread(target=server.serve_connection, args=(right,), daemon=True).start()
        return IpcClient.from_socket(left)

    return connect


def counting(tiny_model) -> tuple[CountingEngine, GeneratorCore, list[Cancelled]]:
    tokenizer = load_tokenizer(tiny_model)
    engine = CountingEngine(token=tokenizer.encode("la", add_special_tokens=False).ids[0])
    records: list[Cancelled] = []
    return engine, core_for(engine, tiny_model, on_cancel=records.append), records


def same_responses(relayed: FakeSink, direct: FakeSink) -> None:
    assert [(final, error) for _, final, error in relayed.responses] == \
           [(final, error) for _, final, error in direct.responses]
    for (ours, _, _), (theirs, _, _) in zip(relayed.responses, direct.responses):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert ours.keys() == theirs.keys()
            for name in ours:
                assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape
                assert ours[name].tolist() == theirs[name].tolist()


@pytest.mark.parametrize("stream", [True, False])
def test_the_relay_sends_exactly_the_responses_the_generator_would_send_triton(engine, tiny_model, builder, stream):
    core = core_for(engine, tiny_model)
    relay = Relay(builder, KEY, 1 << 18, paired(core))
    values = dict(text_input=QUESTION, max_tokens=24, top_k=1, stream=stream, return_num_input_tokens=True,
                  return_num_output_tokens=True)
    relayed = FakeSink()
    relay.start(inputs(**values), relayed, "same")
    direct = FakeSink()
    prepared = builder.from_inputs(inputs(**values), 1 << 18)
    core.submit(*prepared.to_wire(KEY), direct)
    same_responses(relayed.wait(), direct.wait())
    assert relayed.text() and relayed.last()["finish_reason"][0, 0] in (b"stop", b"length")
    assert len(relayed.responses) > 2 if stream else len(relayed.responses) == 1


def test_a_bad_request_is_refused_naming_the_field_before_the_generator_is_reached(builder):
    def connect():
        raise AssertionError("a refused request must not reach the generator")

    relay = Relay(builder, KEY, 100, connect)
    for values, message in [(dict(text_input=QUESTION, max_tokens=0), "bad request: max_tokens must be an integer"),
                            (dict(text_input="x" * 101, max_tokens=4),
                             "bad request: text_input is 101 bytes; this server takes at most 100 bytes"),
                            (dict(text_input=QUESTION, max_tokens=4, stop_words=["ok", "y" * 200]), "stop_words[1]"),
                            (dict(text_input=QUESTION, max_tokens=4, temperature=float("inf")), "temperature")]:
        sink = FakeSink()
        relay.start(inputs(**values), sink)
        assert len(sink.responses) == 1 and sink.responses[0][:2] == (None, True)
        assert message in sink.responses[0][2]


def test_a_cancelled_sender_ends_the_request_in_the_engine(tiny_model, builder):
    counter, core, records = counting(tiny_model)
    relay = Relay(builder, KEY, 1 << 18, paired(core), poll=0.01)
    sink = FakeSink()
    relay.start(inputs(text_input=QUESTION, max_tokens=LONG, stream=True), sink, "gone-client")
    while len(sink.responses) < 3:
        assert not sink.finished.wait(0.01), "ended before the client cancelled"
    sink.cancel = True
    sink.wait()
    assert counter.finished.wait(60), "the engine still runs the row"
    assert sink.responses[-1] == (None, True, None)
    assert [(r.request_id, r.by) for r in records] == [("gone-client", "client")]
    assert counter.steps < LONG
    relay.join(60)
    assert relay.live() == 0


def test_a_stream_whose_connection_closes_is_cancelled_and_only_that_one(tiny_model, builder, tmp_path):
    """A relay that goes away (its client cancelled, or its process died) closes the connection; another
    request under the same id (clients choose ids) runs on."""
    counter, core, records = counting(tiny_model)
    server = IpcServer(core, socket_path(tmp_path / "repo"))
    try:
        other = FakeSink()
        core.submit(*builder.build(QUESTION, 300, stream=True).to_wire(KEY), other, "shared-id")
        client = IpcClient(server.path)
        stream = client.stream(*builder.build(QUESTION, LONG, stream=True).to_wire(KEY), "shared-id")
        assert stream.next(60) is not None
        stream.close()
        other.wait()
    finally:
        server.close()
    assert other.last()["finish_reason"][0, 0] == b"length"
    assert [(r.request_id, r.by) for r in records] == [("shared-id", "client")]
    assert records[0].tokens < LONG


def test_a_cancel_by_request_id_ends_a_relayed_stream(tiny_model, builder):
    """The OpenAI API sends each request under a unique Triton request id and cancels it by that id."""
    counter, core, records = counting(tiny_model)
    connect = paired(core)
    relay = Relay(builder, KEY, 1 << 18, connect)
    sink = FakeSink()
    relay.start(inputs(text_input=QUESTION, max_tokens=LONG, stream=True), sink, "api-7")
    assert counter.started.wait(60)
    with connect() as client:
        assert client.cancel("api-7") is True
    sink.wait()
    assert sink.responses[-1] == (None, True, None) and counter.finished.wait(60)
    assert [(r.request_id, r.by) for r in records] == [("api-7", "request-id")]


def test_the_generator_going_away_fails_the_open_stream_with_a_clear_error(builder):
    left, right = socket.socketpair()

    def generator_that_dies() -> None:
        message = recv_message(right)
        assert message["op"] == "stream"
        send_message(right, {"outputs": {"text_output": "Hel", "prompt": "p"}, "final": False})
        right.close()  # the process ended (killed, out of memory)

    threading.Thread(target=generator_that_dies, daemon=True).start()
    relay = Relay(builder, KEY, 1 << 18, lambda: IpcClient.from_socket(left))
    sink = FakeSink()
    relay.start(inputs(text_input=QUESTION, max_tokens=8, stream=True), sink)
    sink.wait()
    assert sink.text() == "Hel" and sink.responses[-1] == (None, True, GENERATOR_GONE)


def test_an_unreachable_generator_is_a_clear_error(builder, tmp_path):
    relay = Relay(builder, KEY, 1 << 18, lambda: IpcClient(tmp_path / "none.sock"))
    sink = FakeSink()
    relay.start(inputs(text_input=QUESTION, max_tokens=8), sink)
    (outputs, final, error), = sink.responses
    assert outputs is None and final and error.startswith("generation unavailable: the generator is not reachable")


def test_a_reader_that_never_reads_does_not_hold_up_the_engine(tiny_model, builder):
    """The engine's thread only queues a stream's frames; the connection's thread writes them."""
    counter, core, _ = counting(tiny_model)
    counter.delay = 0
    left, right = socket.socketpair()
    right.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # far less than the frames below
    buffered = right.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    threading.Thread(target=IpcServer(core).serve_connection, args=(right,), daemon=True).start()
    with IpcClient.from_socket(left) as client:
        stream = client.stream(*builder.build(QUESTION, LONG, stream=True).to_wire(KEY), "slow")
        assert counter.finished.wait(120), "the engine waited for the reader"
        assert counter.steps == LONG
        frames = []
        while not frames or not frames[-1]["final"]:
            frame = stream.next(60)
            assert frame is not None
            frames.append(frame)
    assert sum(len(json.dumps(f)) for f in frames) > 4 * buffered


def test_a_malformed_stream_request_gets_a_final_error_frame(tiny_model):
    _, core, _ = counting(tiny_model)
    left, right = socket.socketpair()
    threading.Thread(target=IpcServer(core).serve_connection, args=(right,), daemon=True).start()
    with IpcClient.from_socket(left) as client:
        frame = client.stream(b"{}", b"0" * 64, "forged").next(60)
        assert frame["final"] and "steerlm ensemble only" in frame["error"]
        send_message(left, {"op": "stream", "id": "x"})
        assert "document and signature" in recv_message(left)["error"]
    with pytest.raises(IpcError, match="broke|closed"):
        left2, right2 = socket.socketpair()
        right2.close()
        IpcClient.from_socket(left2).stream(b"{}", b"0" * 64).next(60)
