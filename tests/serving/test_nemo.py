"""The NeMo model's request logic without a server (steerlm/serve/nemo.py); end to end in test_unary.py."""

from __future__ import annotations

import pytest

from steerlm.serve.nemo import NEMO_INPUTS, NemoPrompts
from steerlm.serve.requests import RequestBuilder, RequestError

QUESTION = "Where and when did techno music originate?"


@pytest.fixture(scope="module")
def nemo(tiny_model):
    return NemoPrompts(tiny_model)


@pytest.fixture(scope="module")
def card_prompt(tiny_model) -> str:
    return RequestBuilder(tiny_model).build(QUESTION, 8).prompt


def test_a_card_prompt_becomes_the_ensembles_request_for_the_same_conversation(nemo, card_prompt, tiny_model):
    prepared = nemo.prepare(card_prompt, {"max_output_token": 8, "top_k": 1, "top_p": 0.0, "temperature": 1.0})
    ensemble = RequestBuilder(tiny_model).build(QUESTION, 8, sampling={"top_k": 1, "top_p": 0.0, "temperature": 1.0})
    assert prepared == ensemble


def test_the_two_names_of_the_output_limit_must_agree_and_one_is_required(nemo, card_prompt):
    assert nemo.prepare(card_prompt, {"max_output_len": 8}).max_tokens == 8
    with pytest.raises(RequestError, match="max_output_token and max_output_len .* differ"):
        nemo.prepare(card_prompt, {"max_output_token": 8, "max_output_len": 9})
    with pytest.raises(RequestError, match="max_output_token \\(or max_output_len\\) is required"):
        nemo.prepare(card_prompt, {})


def test_errors_name_the_nemo_inputs(nemo, card_prompt):
    with pytest.raises(RequestError, match="max_output_token must be"):
        nemo.prepare(card_prompt, {"max_output_token": 0})
    with pytest.raises(RequestError, match="min_output_len must be"):
        nemo.prepare(card_prompt, {"max_output_token": 4, "min_output_len": 9})


def test_the_inputs_are_those_nemoquery_sends():
    # NVIDIA/NeMo nemo/deploy/query_llm.py (commit ef938b2e68e8): np.int_ for the integers, np.single for floats
    assert NEMO_INPUTS["max_output_token"][0] == NEMO_INPUTS["top_k"][0] == "TYPE_INT64"
    assert NEMO_INPUTS["top_p"][0] == NEMO_INPUTS["temperature"][0] == "TYPE_FP32"
    assert NEMO_INPUTS["prompts"] == ("TYPE_STRING", "1")
