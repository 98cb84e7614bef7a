"""The `generator` model's logic without a server: the real engine, a fake response sender.

Upstream tests its Triton model code the same way (tensorrtllm_backend all_models/tests/test_decode.py, with
mocks in place of pb_utils)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from steerlm.generation import Engine
from steerlm.serve.generator import Cancelled, GeneratorCore, Watchdog
from steerlm.serve.requests import PreparedRequest, RequestBuilder
from steerlm.spec import load_spec
from steerlm.tokenize import load_tokenizer

KEY = b"k" * 32
QUESTION = "Where and when did techno music originate?"


class FakeSink:
    """Records what the model would send through Triton's response sender."""

    def __init__(self) -> None:
        self.responses: list[tuple[dict | None, bool, str | None]] = []
        self.cancel = False
        self.finished = threading.Event()

    def send(self, outputs, final, error=None):
        self.responses.append((outputs, final, error))
        if final:
            self.finished.set()

    def is_cancelled(self):
        return self.cancel

    def wait(self) -> "FakeSink":
        assert self.finished.wait(60), "no final response"
        return self

    def text(self) -> str:
        return "".join(o["text_output"][0, 0].decode() for o, _, _ in self.responses if o)

    def last(self) -> dict:
        return self.responses[-1][0]


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = Engine(tiny_model, max_batch_size=4)
    yield eng
    eng.close()


def make_core(engine, tiny_model, **kwargs) -> GeneratorCore:
    return GeneratorCore(engine, load_tokenizer(tiny_model), load_spec(tiny_model).template.answer_end, KEY, **kwargs)


@pytest.fixture(scope="module")
def core(engine, tiny_model):
    return make_core(engine, tiny_model, sender_poll=0.0)  # the sink is asked before every step


@pytest.fixture(scope="module")
def builder(tiny_model):
    return RequestBuilder(tiny_model)


def run(core, prepared: PreparedRequest, sink: FakeSink | None = None) -> FakeSink:
    sink = sink or FakeSink()
    core.submit(*prepared.to_wire(KEY), sink)
    return sink


def test_streamed_pieces_concatenate_to_the_whole_answer_and_the_last_says_why(core, builder):
    whole = run(core, builder.build(QUESTION, 24)).wait()
    stream = run(core, builder.build(QUESTION, 24, stream=True)).wait()
    assert len(whole.responses) == 1 and len(stream.responses) > 2
    assert stream.text() == whole.text() and whole.text()
    assert stream.responses[0][0]["prompt"][0, 0].decode() == builder.build(QUESTION, 24).prompt
    assert whole.last()["finish_reason"][0, 0] == stream.last()["finish_reason"][0, 0] == b"length"


def test_token_counts_are_returned_when_asked(core, builder):
    prepared = builder.build(QUESTION, 9, return_num_input_tokens=True, return_num_output_tokens=True)
    out = run(core, prepared).wait().last()
    assert int(out["num_input_tokens"][0, 0]) == len(prepared.input_ids)
    assert int(out["num_output_tokens"][0, 0]) == 9


def test_a_stop_string_seen_in_text_ends_the_answer_and_frees_the_row(core, builder, engine):
    answer = run(core, builder.build(QUESTION, 60)).wait().text()
    stop = answer[len(answer) // 3 : len(answer) // 3 + 3]
    sink = run(core, builder.build(QUESTION, 800, stop_words=[stop])).wait()
    steps_at_stop = engine.steps
    assert sink.text() == answer[: answer.index(stop)]
    assert sink.last()["finish_reason"][0, 0] == b"stop"
    deadline = time.monotonic() + 30
    while engine.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pending() == 0
    assert engine.steps - steps_at_stop <= 3  # without the drop: ~800 more steps


def test_a_cancelled_client_leaves_the_batch_within_a_few_steps(core, builder, engine):
    sink = run(core, builder.build(QUESTION, 800, stream=True))
    while len(sink.responses) < 3:
        time.sleep(0.005)
    sink.cancel = True
    steps_at_cancel = engine.steps
    sink.wait()
    deadline = time.monotonic() + 30
    while engine.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pending() == 0
    assert engine.steps - steps_at_cancel <= 3
    assert sink.responses[-1] == (None, True, None)  # the final flag alone


def test_each_cancelled_request_is_reported_once_with_its_cost_and_when_it_left(engine, tiny_model, builder):
    records: list[Cancelled] = []
    core = make_core(engine, tiny_model, on_cancel=records.append)
    by_client, by_id = FakeSink(), FakeSink()
    core.submit(*builder.build(QUESTION, 800, stream=True).to_wire(KEY), by_client, "client-gone")
    core.submit(*builder.build(QUESTION, 800, stream=True).to_wire(KEY), by_id, "cancelled-by-id")
    while len(by_client.responses) < 3 or len(by_id.responses) < 3:
        time.sleep(0.005)
    asked = time.monotonic()
    by_client.cancel = True
    assert core.cancel("cancelled-by-id")
    by_client.wait(), by_id.wait()
    done = time.monotonic()
    assert sorted((r.request_id, r.by) for r in records) == [("cancelled-by-id", "request-id"),
                                                             ("client-gone", "client")]
    for record, sink in zip(sorted(records, key=lambda r: r.by), (by_client, by_id)):
        assert asked <= record.left_at <= done
        assert len(sink.responses) - 1 <= record.tokens < 800  # one token per streamed piece at most
    # The line the Triton model logs reads back as the same record, whatever the id's characters.
    odd = Cancelled('id with "quotes" and spaces', "client", 7, 12.5)
    assert Cancelled.from_log(f'I1201 model.py:1] "{odd.log_line()}"\nother line') == [odd]


class CountingSink(FakeSink):
    def __init__(self, cancel: bool = False) -> None:
        super().__init__()
        self.cancel, self.asked = cancel, 0

    def is_cancelled(self):
        self.asked += 1
        return self.cancel


def test_the_sender_is_asked_before_the_first_step_then_at_most_once_per_interval(engine, tiny_model, builder):
    """Through the ensemble Triton 2.51 reports only a cancellation that came before the generator's step was
    scheduled (docs/serving.md "Cancellation"), and each is_cancelled() is a round trip to the server process."""
    core = make_core(engine, tiny_model, sender_poll=0.05)
    gone = CountingSink(cancel=True)
    steps = engine.steps
    core.submit(*builder.build(QUESTION, 800, stream=True).to_wire(KEY), gone)
    assert gone.wait().responses == [(None, True, None)]  # no token generated for it
    assert engine.steps - steps <= 1
    running = CountingSink()
    started = time.monotonic()
    core.submit(*builder.build(QUESTION, 200, stream=True).to_wire(KEY), running)
    running.wait()
    elapsed = time.monotonic() - started
    assert len(running.responses) > 100  # many steps ...
    assert 1 <= running.asked <= 2 + elapsed / 0.05  # ... but only one question per interval


def test_requests_not_built_by_preprocessing_are_refused(core, builder):
    document, signature = builder.build(QUESTION, 4).to_wire(KEY)
    forged = json.loads(document)
    forged["input_ids"] = [2, 3, 4]  # e.g. control tokens the template would never emit for user text
    sink = run(core, PreparedRequest(**forged), FakeSink())  # signed with the right key: accepted
    assert sink.wait().responses[-1][2] is None
    refused = FakeSink()
    core.submit(json.dumps(forged).encode(), signature, refused)
    assert refused.responses == [(None, True, "this model takes requests from the steerlm ensemble only; send "
                                              "yours to `steerlm`")]


class StuckEngine:
    def __init__(self, pending: int, last_progress: float) -> None:
        self._pending, self.last_progress = pending, last_progress

    def pending(self) -> int:
        return self._pending


def test_watchdog_reports_an_engine_with_work_and_no_progress():
    stalls: list[str] = []
    engine = StuckEngine(pending=2, last_progress=0.0)
    dog = Watchdog(engine, timeout=5, on_stall=stalls.append, interval=3600)
    try:
        assert dog.check(now=100.0) is None  # busy only from now on
        assert dog.check(now=104.0) is None
        assert "no progress for 6 s with 2 request(s) pending" in dog.check(now=106.0)
        engine.last_progress = 106.0
        assert dog.check(now=107.0) is None
    finally:
        dog.stop()


def test_watchdog_ignores_an_idle_engine():
    dog = Watchdog(StuckEngine(pending=0, last_progress=0.0), timeout=1, on_stall=lambda m: None, interval=3600)
    try:
        assert dog.check(now=1e6) is None
    finally:
        dog.stop()
