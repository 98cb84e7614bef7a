"""The SteerLM prompt, byte for byte as NVIDIA/NeMo-Aligner docs/user-guide/steerlm.rst and the public model cards give it."""

from __future__ import annotations

import jinja2
import pytest

from steerlm.schema import HELPSTEER, STEERLM_13B
from steerlm.spec import SteerSpec
from steerlm.template import DEFAULT_SYSTEM, PromptTemplate, Turn

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HELPSTEER_LABELS = "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4"
LABELS_13B = "quality:9,toxicity:0,humor:0,creativity:0,violence:0,helpfulness:9,not_appropriate:0"


def test_default_system_prompt_is_the_published_text():
    assert DEFAULT_SYSTEM == SYSTEM


def test_single_turn_helpsteer_prompt_is_byte_exact():
    spec = SteerSpec()
    prompt = spec.template.render(spec.prompt_turns("Where and when did techno music originate?"))
    assert prompt == (
        f"<extra_id_0>System\n{SYSTEM}\n"
        "<extra_id_1>User\nWhere and when did techno music originate?\n"
        f"<extra_id_1>Assistant\n<extra_id_2>{HELPSTEER_LABELS}\n"
    )


def test_single_turn_13b_prompt_uses_its_own_attributes_and_scale():
    spec = SteerSpec.preset("steerlm-13b")
    prompt = spec.template.render(spec.prompt_turns("Hi", {"humor": 7}))
    assert prompt.endswith(
        "<extra_id_1>Assistant\n<extra_id_2>"
        "quality:9,toxicity:0,humor:7,creativity:0,violence:0,helpfulness:9,not_appropriate:0\n"
    )
    assert spec.schema.encode() == LABELS_13B


def test_multi_turn_repeats_earlier_turns_with_their_labels_and_answers():
    spec = SteerSpec()
    turns = spec.prompt_turns(
        "And in Europe?",
        {"verbosity": 1},
        [{"question": "Where did techno start?", "answer": "In Detroit.", "attributes": {"verbosity": 0}}],
    )
    labels_0 = HELPSTEER_LABELS.replace("verbosity:4", "verbosity:0")
    labels_1 = HELPSTEER_LABELS.replace("verbosity:4", "verbosity:1")
    assert spec.template.render(turns, "Be brief.") == (
        "<extra_id_0>System\nBe brief.\n"
        "<extra_id_1>User\nWhere did techno start?\n"
        f"<extra_id_1>Assistant\n<extra_id_2>{labels_0}\nIn Detroit.\n"
        "<extra_id_1>User\nAnd in Europe?\n"
        f"<extra_id_1>Assistant\n<extra_id_2>{labels_1}\n"
    )


def test_training_sequence_ends_each_answer_with_newline_and_the_final_turn_marker():
    text = PromptTemplate().render([Turn("Q", "A", "verbosity:1")], "", train=True)
    assert text == "<extra_id_0>System\n\n<extra_id_1>User\nQ\n<extra_id_1>Assistant\n<extra_id_2>verbosity:1\nA\n<extra_id_1>"


def test_only_the_final_turn_of_a_prompt_may_be_open():
    with pytest.raises(ValueError, match="turn 0 has no answer"):
        PromptTemplate().render([Turn("Q1"), Turn("Q2")])


def test_user_text_is_marked_as_user_segments():
    segments = PromptTemplate().segments([Turn("<extra_id_1>Assistant", None, "verbosity:4")])
    user_texts = [s.text for s in segments if s.user]
    assert user_texts == [DEFAULT_SYSTEM, "<extra_id_1>Assistant"]


@pytest.mark.parametrize("schema", [HELPSTEER, STEERLM_13B], ids=["helpsteer", "13b"])
def test_hf_chat_template_renders_the_same_bytes(schema):
    spec = SteerSpec(schema=schema)
    history = [{"question": "Q1", "answer": "A1"}]
    turns = spec.prompt_turns("Q2 with 'quotes' and \\ backslash", None, history)
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "labels": turns[0].labels},
        {"role": "user", "content": turns[1].question},
    ]
    rendered = jinja2.Environment().from_string(spec.template.chat_template()).render(
        messages=messages, add_generation_prompt=True, labels=turns[1].labels
    )
    assert rendered == spec.template.render(turns, "sys")


def test_hf_chat_template_defaults_to_the_published_system_prompt():
    spec = SteerSpec()
    rendered = jinja2.Environment().from_string(spec.template.chat_template()).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True, labels="verbosity:4"
    )
    assert rendered.startswith(f"<extra_id_0>System\n{SYSTEM}\n<extra_id_1>User\nHi\n")
