"""The generator's response queue: the engine's thread hands a response over and never waits for its send
(a python-backend send is a round trip to the Triton process); a request's waiting pieces are merged."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from steerlm.serve.generator import ResponseQueue


def text(value: str) -> dict:
    return {"text_output": np.array([[value.encode()]], dtype=np.object_)}


class SlowSink:
    """A response sender whose sends block until `gate` opens (a busy Triton process)."""

    def __init__(self, gate: threading.Event | None = None, fails: bool = False) -> None:
        self.gate = gate
        self.fails = fails
        self.sent: list[tuple[dict | None, bool, str | None]] = []
        self.final = threading.Event()
        self.entered = threading.Event()

    def send(self, outputs, final, error=None):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(60)
        if self.fails:
            raise RuntimeError("the response sender is closed")
        self.sent.append((outputs, final, error))
        if final:
            self.final.set()

    def is_cancelled(self):
        return False

    def texts(self) -> list[str]:
        return [b"".join(o["text_output"].reshape(-1).tolist()).decode() for o, _, _ in self.sent if o]


@pytest.fixture
def responses():
    q = ResponseQueue()
    yield q
    q.close()


def test_a_send_returns_before_the_response_is_sent(responses):
    gate = threading.Event()
    sink = SlowSink(gate)
    responses.wrap(sink).send(text("a"), final=True)  # would block here if sent on this thread
    assert sink.sent == []
    gate.set()
    assert sink.final.wait(60)
    assert sink.texts() == ["a"]


def test_pieces_waiting_for_a_busy_sender_arrive_merged_in_order(responses):
    gate = threading.Event()
    blocker, sink = SlowSink(gate), SlowSink()
    responses.wrap(blocker).send(text("x"), final=True)
    assert blocker.entered.wait(60)  # the sender thread is now busy; what follows waits in the queue
    wrapped = responses.wrap(sink)
    first = {**text("Hel"), "prompt": np.array([[b"P"]], dtype=np.object_)}
    wrapped.send(first, final=False)
    wrapped.send(text("lo"), final=False)
    wrapped.send({**text(" world"), "finish_reason": np.array([[b"length"]], dtype=np.object_)}, final=True)
    gate.set()
    assert sink.final.wait(60)
    assert sink.texts() == ["Hello world"]
    outputs, final, error = sink.sent[0]
    assert final and error is None
    assert outputs["prompt"][0, 0] == b"P" and outputs["finish_reason"][0, 0] == b"length"


def test_an_error_is_never_merged_into_text(responses):
    gate = threading.Event()
    blocker, sink = SlowSink(gate), SlowSink()
    responses.wrap(blocker).send(text("x"), final=True)
    assert blocker.entered.wait(60)
    wrapped = responses.wrap(sink)
    wrapped.send(text("partial"), final=False)
    wrapped.send(None, final=True, error="generation failed")
    gate.set()
    assert sink.final.wait(60)
    assert [(bool(o), f, e) for o, f, e in sink.sent] == [(True, False, None), (False, True, "generation failed")]


def test_one_failing_sender_does_not_stop_the_others(responses):
    broken, healthy = SlowSink(fails=True), SlowSink()
    responses.wrap(broken).send(text("a"), final=True)
    responses.wrap(healthy).send(text("b"), final=True)
    assert healthy.final.wait(60)
    assert healthy.texts() == ["b"]


def test_close_sends_what_is_queued():
    q = ResponseQueue()
    gate = threading.Event()
    sinks = [SlowSink(gate) for _ in range(3)]
    for i, sink in enumerate(sinks):
        q.wrap(sink).send(text(str(i)), final=True)
    gate.set()
    q.close()
    assert [s.texts() for s in sinks] == [["0"], ["1"], ["2"]]


class CancellableSink(SlowSink):
    def __init__(self) -> None:
        super().__init__()
        self.cancelled = False
        self.asked = 0

    def is_cancelled(self):
        self.asked += 1
        return self.cancelled


def test_a_cancellation_is_seen_within_the_poll_interval_and_asked_at_most_once_per_interval(responses):
    sink = CancellableSink()
    wrapped = responses.wrap(sink)
    assert not any(wrapped.is_cancelled() for _ in range(100))
    assert sink.asked < 100  # back-to-back questions within one interval reuse the answer
    sink.cancelled = True
    deadline = time.monotonic() + 60
    while not wrapped.is_cancelled():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert wrapped.is_cancelled()  # and stays so
