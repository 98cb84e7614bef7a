"""The generator asks Triton whether a request is cancelled (a round trip to the server process) at most every
few milliseconds, however often the engine polls, and still sees a cancellation within that interval."""

from __future__ import annotations

import time

from steerlm.serve.generator import PolledSink


class Sender:
    def __init__(self) -> None:
        self.cancelled = False
        self.asked = 0
        self.sent: list[tuple] = []

    def send(self, outputs, final, error=None):
        self.sent.append((outputs, final, error))

    def is_cancelled(self):
        self.asked += 1
        return self.cancelled


def test_back_to_back_polls_reuse_one_answer():
    sender = Sender()
    sink = PolledSink(sender)
    assert not any(sink.is_cancelled() for _ in range(100))
    assert sender.asked < 100


def test_a_cancellation_is_seen_within_the_poll_interval_and_stays_seen():
    sender = Sender()
    sink = PolledSink(sender)
    assert not sink.is_cancelled()
    sender.cancelled = True
    start = time.monotonic()
    while not sink.is_cancelled():
        assert time.monotonic() - start < 60
        time.sleep(0.001)
    asked = sender.asked
    assert sink.is_cancelled() and sender.asked == asked  # a cancelled request is never asked again


def test_responses_pass_straight_through():
    sender = Sender()
    PolledSink(sender).send({"text_output": "x"}, final=True, error=None)
    assert sender.sent == [({"text_output": "x"}, True, None)]
