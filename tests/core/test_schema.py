"""Attribute schemas and label strings: validation, defaults and the clamp/round rule."""

from __future__ import annotations

import pytest

from steerlm.schema import HELPSTEER, STEERLM_13B, Attribute, AttributeSchema, SchemaError


def test_helpsteer_order_is_nemo_aligner_order():
    assert HELPSTEER.names == [
        "quality", "toxicity", "humor", "creativity",
        "helpfulness", "correctness", "coherence", "complexity", "verbosity",
    ]
    assert all((a.min, a.max) == (0, 4) for a in HELPSTEER.attributes)


def test_13b_schema_has_seven_attributes_on_zero_to_nine():
    assert STEERLM_13B.names == ["quality", "toxicity", "humor", "creativity", "violence", "helpfulness", "not_appropriate"]
    assert all((a.min, a.max) == (0, 9) for a in STEERLM_13B.attributes)


def test_encode_fills_left_out_attributes_with_defaults_in_schema_order():
    assert HELPSTEER.encode({"verbosity": 0, "creativity": 2}) == (
        "quality:4,toxicity:0,humor:0,creativity:2,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:0"
    )


def test_parse_accepts_colon_and_equals_and_spaces():
    assert HELPSTEER.parse(" verbosity:4, creativity=1 ") == {"verbosity": 4, "creativity": 1}


def test_parse_of_empty_string_is_empty():
    assert HELPSTEER.parse("") == {}


def test_a_partial_label_string_carries_only_present_attributes_in_schema_order():
    assert HELPSTEER.encode({"verbosity": 3, "complexity": 1}, partial=True) == "complexity:1,verbosity:3"
    assert HELPSTEER.encode({}, partial=True) == ""
    with pytest.raises(SchemaError, match="outside allowed range"):
        HELPSTEER.encode({"verbosity": 9}, partial=True)


def test_parse_round_trips_a_full_label_string():
    text = HELPSTEER.encode({"humor": 3})
    assert HELPSTEER.encode(HELPSTEER.parse(text, partial=False)) == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("verbosity:5", r"verbosity: value 5 outside allowed range 0..4"),
        ("verbosity:-1", r"outside allowed range 0..4"),
        ("verbosity:high", r"verbosity: value 'high' is not an integer \(0..4\)"),
        ("sarcasm:1", r"unknown attribute 'sarcasm'; this model's attributes are: quality, toxicity"),
        ("verbosity", r"must look like name:value"),
        ("verbosity:1,verbosity:2", r"given twice"),
    ],
)
def test_parse_rejects_bad_labels_with_a_message_naming_field_and_allowed_values(text, message):
    with pytest.raises(SchemaError, match=message):
        HELPSTEER.parse(text)


def test_strict_parse_requires_every_attribute():
    with pytest.raises(SchemaError, match="lacks attributes: quality"):
        HELPSTEER.parse("verbosity:1", partial=False)


def test_complete_rejects_non_integer_values():
    with pytest.raises(SchemaError, match="not an integer"):
        HELPSTEER.complete({"verbosity": 2.5})
    with pytest.raises(SchemaError, match="not an integer"):
        HELPSTEER.complete({"verbosity": True})


def test_scores_are_clamped_to_the_range_then_rounded():
    scores = [4.7, -0.3, 1.49, 1.51, 2.0, 3.5, 0.0, 9.0, -5.0]
    assert list(HELPSTEER.from_scores(scores).values()) == [4, 0, 1, 2, 2, 4, 0, 4, 0]


def test_scores_must_match_the_number_of_attributes():
    with pytest.raises(SchemaError, match="expected 9 scores, got 2"):
        HELPSTEER.from_scores([1, 2])


def test_13b_scores_clamp_to_nine():
    assert STEERLM_13B.from_scores([12, 0, 0, 0, 0, 8.6, 0])["quality"] == 9


def test_schema_rejects_duplicate_names_and_bad_defaults():
    with pytest.raises(SchemaError, match="duplicate"):
        AttributeSchema((Attribute("a"), Attribute("a")))
    with pytest.raises(SchemaError, match="default 7 outside 0..4"):
        Attribute("a", 0, 4, 7)
    with pytest.raises(SchemaError, match="without ','"):
        Attribute("a,b")


def test_schema_survives_a_dict_round_trip():
    assert AttributeSchema.from_dict(STEERLM_13B.to_dict()) == STEERLM_13B
