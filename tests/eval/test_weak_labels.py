"""The weak labeller's documented bins."""

from __future__ import annotations

import pytest

from steer_eval.weak_labels import complexity_label, readability_index, verbosity_label, weak_labels


@pytest.mark.parametrize(
    "words, expected", [(1, 0), (3, 0), (4, 1), (8, 1), (9, 2), (16, 2), (17, 3), (32, 3), (33, 4), (900, 4)]
)
def test_verbosity_bins_by_word_count(words, expected):
    assert verbosity_label(" ".join(["word"] * words)) == expected


def test_readability_index_follows_the_ari_formula():
    text = "The cat sat. The dog ran."  # 6 words, 18 letters, 2 sentences
    assert readability_index(text) == pytest.approx(4.71 * 18 / 6 + 0.5 * 6 / 2 - 21.43)


def test_complexity_rises_with_long_words_and_long_sentences():
    simple = "I like my dog. It is big. We run a lot. It is fun."
    dense = (
        "Notwithstanding considerable methodological heterogeneity, contemporary epidemiological investigations "
        "consistently demonstrate statistically significant associations between socioeconomic disadvantage "
        "and cardiovascular morbidity"
    )
    assert complexity_label(simple) == 0
    assert complexity_label(dense) == 4


def test_too_short_answers_get_no_complexity_label():
    assert complexity_label("You too!") is None
    assert weak_labels("You too!") == {"verbosity": 0}


def test_attributes_text_cannot_measure_are_refused():
    with pytest.raises(ValueError, match="cannot measure humor"):
        weak_labels("ha ha", ("humor",))
