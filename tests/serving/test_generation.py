"""The CPU generation engine behind `tensorrt_llm`: greedy = Hugging Face greedy, batching changes nothing."""

from __future__ import annotations

import threading

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
