"""The torch generation engine behind `generator`: greedy = Hugging Face greedy, batching changes nothing."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from steerlm.generation import Engine, GenerationRequest, SamplingParams
from steerlm.serve.requests import RequestBuilder

QUESTIONS = ["Where and when did techno music originate?", "hi", "Explain neural networks step by step.", "x" * 40]


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = Engine(tiny_model, max_batch_size=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(tiny_model):
    builder = RequestBuilder(tiny_model)
    return [builder.build(q, 8).input_ids for q in QUESTIONS], builder.end_id


def test_greedy_matches_hugging_face_generate(engine, prompts):
    ids, end_id = prompts
    for prompt in ids[:2]:
        ours = engine.generate(prompt, SamplingParams(max_tokens=16, end_id=end_id))
        ref = engine.model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=end_id,
                                    pad_token_id=end_id)[0, len(prompt):].tolist()
        assert ours == [t for t in ref if t != end_id]


def test_requests_joining_a_running_batch_get_their_solo_answers(engine, prompts):
    ids, end_id = prompts
    lengths = [20, 6, 14, 10]  # rows leave the batch at different steps
    alone = [engine.generate(p, SamplingParams(max_tokens=n, end_id=end_id)) for p, n in zip(ids, lengths)]
    results, done = [None] * len(ids), [threading.Event() for _ in ids]

    def emitter(i):
        tokens = []

        def emit(new, final):
            tokens.extend(new)
            if final:
                results[i] = tokens
                done[i].set()
        return emit

    for i, (p, n) in enumerate(zip(ids, lengths)):
        engine.submit(GenerationRequest(p, SamplingParams(max_tokens=n, end_id=end_id), emitter(i), stream=i % 2 == 0))
    assert all(d.wait(60) for d in done)
    assert results == alone


def test_stop_words_end_the_sequence_and_are_returned(engine, prompts):
    ids, end_id = prompts
    free = engine.generate(ids[0], SamplingParams(max_tokens=12, end_id=end_id))
    stop = free[3:5]
    end = next(i + 2 for i in range(len(free)) if free[i : i + 2] == stop)  # first occurrence, inclusive
    assert engine.generate(ids[0], SamplingParams(max_tokens=12, end_id=end_id, stop_words=[stop])) == free[:end]


def test_bad_words_are_never_generated(engine, prompts):
    ids, end_id = prompts
    free = engine.generate(ids[0], SamplingParams(max_tokens=8, end_id=end_id))
    banned = engine.generate(ids[0], SamplingParams(max_tokens=8, end_id=end_id, bad_words=[[free[0]]]))
    assert free[0] not in banned


def test_same_seed_same_sample(engine, prompts):
    ids, end_id = prompts
    params = SamplingParams(max_tokens=12, end_id=end_id, temperature=0.9, top_k=40, top_p=0.95, seed=11)
    assert engine.generate(ids[0], params) == engine.generate(ids[0], params)


def test_too_long_request_fails_alone(engine, prompts):
    ids, end_id = prompts
    with pytest.raises(RuntimeError, match="exceeds the model's 1024 positions"):
        engine.generate(ids[0], SamplingParams(max_tokens=2000, end_id=end_id))
    assert engine.generate(ids[1], SamplingParams(max_tokens=2, end_id=end_id))


def _submit_all(engine, jobs):
    """Submit (prompt, params) pairs at once; [(tokens, error)] per job."""
    return _wait(*_submit(engine, jobs))


def _wait(out, done):
    assert all(d.wait(60) for d in done)
    return out


def _submit(engine, jobs):
    """Submit (prompt, params) pairs at once; what `_wait` turns into [(tokens, error)] per job."""
    out = [None] * len(jobs)
    done = [threading.Event() for _ in jobs]

    def callbacks(i):
        tokens = []

        def emit(new, final):
            tokens.extend(new)
            if final:
                out[i] = (tokens, None)
                done[i].set()

        def fail(msg):
            out[i] = (tokens, msg)
            done[i].set()
        return emit, fail

    for i, (prompt, params) in enumerate(jobs):
        emit, fail = callbacks(i)
        engine.submit(GenerationRequest(prompt, params, emit, fail=fail))
    return out, done


@pytest.mark.parametrize("poison, field", [
    # temperature 1e39 sent as FP32 arrives as +inf (issue: with a bad word it failed the whole batch)
    (dict(temperature=float("inf"), top_k=50, bad_words=[[5, 6]]), "temperature"),
    (dict(temperature=float("nan"), top_k=50), "temperature"),
    (dict(top_p=float("nan"), temperature=1.0), "top_p"),
    (dict(top_k=-5), "top_k"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(min_tokens=99), "min_tokens"),
])
def test_a_poisoned_request_fails_alone_next_to_healthy_ones(engine, prompts, poison, field):
    ids, end_id = prompts
    healthy = SamplingParams(max_tokens=10, end_id=end_id)
    alone = engine.generate(ids[1], healthy)
    jobs = [(ids[1], healthy), (ids[0], SamplingParams(max_tokens=10, end_id=end_id, **poison)), (ids[1], healthy)]
    results = _submit_all(engine, jobs)
    assert results[1][1] is not None and results[1][1].startswith(field)
    assert results[0] == results[2] == (alone, None)


def test_a_row_whose_sampling_fails_ends_alone(engine, prompts):
    """Every token banned: nothing can be sampled for that row; the batch goes on."""
    ids, end_id = prompts
    vocab = engine.model.config.vocab_size
    healthy = SamplingParams(max_tokens=10, end_id=end_id)
    alone = engine.generate(ids[1], healthy)
    everything = SamplingParams(max_tokens=10, end_id=end_id, bad_words=[[t] for t in range(vocab)])
    results = _submit_all(engine, [(ids[1], healthy), (ids[0], everything), (ids[1], healthy)])
    assert "sampling failed" in results[1][1]
    assert results[0] == results[2] == (alone, None)


def test_min_tokens_holds_back_the_end_id(engine, prompts):
    ids, end_id = prompts
    first = engine.generate(ids[0], SamplingParams(max_tokens=1, end_id=end_id))[0]
    # With the greedy first token as end id the answer is empty, unless min_tokens holds it back.
    assert engine.generate(ids[0], SamplingParams(max_tokens=6, end_id=first)) == []
    held = engine.generate(ids[0], SamplingParams(max_tokens=6, end_id=first, min_tokens=3))
    assert len(held) >= 3 and first not in held[:3]


def test_penalties_change_a_greedy_answer_that_repeats(engine, prompts):
    ids, end_id = prompts
    plain = engine.generate(ids[0], SamplingParams(max_tokens=40, end_id=end_id))
    assert len(set(plain)) < len(plain), "the tiny model's greedy answer repeats tokens"
    for kwargs in (dict(repetition_penalty=5.0), dict(presence_penalty=50.0), dict(frequency_penalty=50.0)):
        penalized = engine.generate(ids[0], SamplingParams(max_tokens=40, end_id=end_id, **kwargs))
        assert penalized != plain, kwargs
        if "repetition_penalty" not in kwargs:  # output-only penalties of 50 forbid any repeat in practice
            assert len(set(penalized)) == len(penalized), kwargs


@contextlib.contextmanager
def _engine_held(engine, prompt, max_tokens=1, events=None):
    """Hold the engine's thread in a request's first token callback: what is submitted inside the block waits in
    the queue, and the engine takes all of it at once when the block ends. The holding request streams; its
    tokens go to `events` as ("held", token)."""
    held, release = threading.Event(), threading.Event()

    def emit(new, final):
        if events is not None:
            events.extend(("held", t) for t in new)
        held.set()
        assert release.wait(60)

    engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens), emit, stream=True))
    assert held.wait(60)
    try:
        yield
    finally:
        release.set()


def test_prompts_of_different_lengths_prefilled_together_get_their_solo_answers(engine, prompts):
    ids, _ = prompts
    assert len({len(p) for p in ids}) == len(ids) == engine.max_batch_size
    params = SamplingParams(max_tokens=6)  # no end id: every row runs all 6 tokens
    alone = [engine.generate(p, params) for p in ids]
    with _engine_held(engine, ids[1]):
        before = engine.steps
        pending = _submit(engine, [(p, params) for p in ids])
    assert _wait(*pending) == [(a, None) for a in alone]
    assert engine.steps - before == 1 + 5  # one prefill for all four, then five decode steps


@pytest.mark.parametrize("budget_rows, forwards", [(2, 2), (0.5, 4)])
def test_the_token_budget_splits_a_prefill_and_a_longer_prompt_runs_alone(tiny_model, prompts, budget_rows,
                                                                            forwards):
    ids, _ = prompts
    prompt = ids[0]
    eng = Engine(tiny_model, max_batch_size=4, max_prefill_tokens=int(budget_rows * len(prompt)))
    try:
        params = SamplingParams(max_tokens=1)  # a request ends at its prefill: steps count prefill forwards
        alone = eng.generate(prompt, params)
        with _engine_held(eng, ids[1]):
            before = eng.steps
            pending = _submit(eng, [(prompt, params)] * 4)
        assert _wait(*pending) == [(alone, None)] * 4
        assert eng.steps - before == forwards
    finally:
        eng.close()


@pytest.mark.parametrize("budget", [0, -5, 1.5, True])
def test_the_token_budget_must_be_a_positive_integer(tiny_model, budget):
    with pytest.raises(ValueError, match=f"max_prefill_tokens must be an integer >= 1, got {budget!r}"):
        Engine(tiny_model, max_prefill_tokens=budget)


def test_running_rows_advance_between_prefills_that_the_budget_splits(tiny_model, prompts):
    ids, _ = prompts
    eng = Engine(tiny_model, max_batch_size=4, max_prefill_tokens=len(ids[0]))  # one row per prefill
    try:
        running_alone = eng.generate(ids[1], SamplingParams(max_tokens=8))
        joiners = [ids[0], ids[2], ids[3]]
        events = []

        def emitter(i):
            def emit(new, final):
                events.append(("joined", i))
            return emit

        with _engine_held(eng, ids[1], max_tokens=8, events=events):
            for i, p in enumerate(joiners):
                eng.submit(GenerationRequest(p, SamplingParams(max_tokens=1), emitter(i)))
        deadline = time.monotonic() + 60
        while eng.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [t for kind, t in events if kind == "held"] == running_alone
        joined = [n for n, (kind, _) in enumerate(events) if kind == "joined"]
        assert len(joined) == len(joiners)
        for a, b in zip(joined, joined[1:]):
            assert any(kind == "held" for kind, _ in events[a:b]), events  # a decode step between two prefills
        assert events[-1][0] == "held", events  # they joined while it ran, not after it
    finally:
        eng.close()


def test_a_request_that_breaks_a_shared_prefill_fails_alone(engine, prompts):
    ids, end_id = prompts
    params = SamplingParams(max_tokens=5, end_id=end_id)
    alone = engine.generate(ids[2], params)
    bad = ids[0][:-1] + [engine.model.config.vocab_size + 7]  # no such token: the embedding lookup fails
    with _engine_held(engine, ids[1]):
        pending = _submit(engine, [(ids[2], params), (bad, params), (ids[2], params)])
    results = _wait(*pending)
    assert results[1][1] is not None and "index out of range" in results[1][1]
    assert results[0] == results[2] == (alone, None)


def test_cancelled_rows_leave_the_batch_before_the_next_step(engine, prompts):
    ids, end_id = prompts
    cancel = threading.Event()
    got, steps = [], []

    def emit(new, final):
        got.extend(new)
        if len(got) == 3:
            cancel.set()
            steps.append(engine.steps)

    engine.submit(GenerationRequest(ids[0], SamplingParams(max_tokens=500, end_id=end_id), emit, stream=True,
                                    cancelled=cancel.is_set))
    assert cancel.wait(60)
    while engine.pending():
        threading.Event().wait(0.01)
    assert len(got) <= 4 and engine.steps - steps[0] <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_is_refused_with_the_reason(tiny_model):
    with pytest.raises(RuntimeError, match="device 'cuda': this PyTorch build sees no CUDA device"):
        Engine(tiny_model, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU engine is tested above)")
def test_the_engine_runs_on_cuda_in_bf16_batched_and_sampled(tiny_model, prompts):
    ids, end_id = prompts
    eng = Engine(tiny_model, device="cuda", max_batch_size=4)
    try:
        assert next(eng.model.parameters()).dtype == torch.bfloat16
        greedy = eng.generate(ids[0], SamplingParams(max_tokens=12, end_id=end_id))
        sampled = SamplingParams(max_tokens=12, end_id=end_id, temperature=0.8, top_k=40, seed=3)
        assert greedy and eng.generate(ids[0], sampled) == eng.generate(ids[0], sampled)
        results = _submit_all(eng, [(p, SamplingParams(max_tokens=8, end_id=end_id)) for p in ids])
        assert all(err is None and tokens for tokens, err in results)
    finally:
        eng.close()
