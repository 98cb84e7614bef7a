"""A weak labeller: attribute values measured from the answer text alone, for demo data without human labels.

Only attributes that text statistics can honestly measure are labelled; every other attribute is left
missing (NeMo's -100: absent from the label string, masked out of the reward-model loss).

verbosity (0..4) from the answer's word count (whitespace-separated words):

    words:      1-3   4-8   9-16   17-32   >=33
    verbosity:   0     1     2      3       4

(Short, doubling bins on purpose: the CPU demo trains a model from scratch in a few minutes, and it learns
to stop where the label says only when stops come every few dozen tokens; see docs/eval.md, "Measured".)

complexity (0..4) from the Automated Readability Index of the answer,
ARI = 4.71 * (letters and digits / words) + 0.5 * (words / sentences) - 21.43, an estimate of the
US school grade needed to read the text (long words and long sentences push it up):

    ARI:        <3    3-6    6-9    9-12    >=12
    complexity:  0     1      2       3       4

(Edges chosen so that chat answers spread over the scale: on the MT-Bench reference answers, which
mix prose with code and math, they fall at about the 30th, 50th, 75th and 92nd percentiles.)

Answers shorter than 8 words get no complexity label: ARI is meaningless on a few words.
"""

from __future__ import annotations

import re
from bisect import bisect_right

# Lower edges of bins 1..4; a value below the first edge is bin 0.
VERBOSITY_WORD_EDGES = (4, 9, 17, 33)
COMPLEXITY_ARI_EDGES = (3.0, 6.0, 9.0, 12.0)
MIN_WORDS_FOR_COMPLEXITY = 8
MEASURED_ATTRIBUTES = ("complexity", "verbosity")

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n\s*\n")


def word_count(text: str) -> int:
    return len(text.split())


def readability_index(text: str) -> float:
    """Automated Readability Index; a text without sentence punctuation counts as one sentence."""
    words = text.split()
    if not words:
        return 0.0
    letters = sum(ch.isalnum() for ch in text)
    sentences = max(1, len(_SENTENCE_END.findall(text.strip())))
    return 4.71 * letters / len(words) + 0.5 * len(words) / sentences - 21.43


def verbosity_label(text: str) -> int:
    return bisect_right(VERBOSITY_WORD_EDGES, word_count(text))


def complexity_label(text: str) -> int | None:
    if word_count(text) < MIN_WORDS_FOR_COMPLEXITY:
        return None
    return bisect_right(COMPLEXITY_ARI_EDGES, readability_index(text))


def weak_labels(answer: str, attributes: tuple[str, ...] = MEASURED_ATTRIBUTES) -> dict[str, int]:
    """The measurable attributes of `answer` among `attributes`; unmeasurable ones are simply absent."""
    unknown = sorted(set(attributes) - set(MEASURED_ATTRIBUTES))
    if unknown:
        raise ValueError(
            f"the weak labeller cannot measure {', '.join(unknown)}; it measures {', '.join(MEASURED_ATTRIBUTES)}"
        )
    out: dict[str, int] = {}
    if "complexity" in attributes:
        value = complexity_label(answer)
        if value is not None:
            out["complexity"] = value
    if "verbosity" in attributes:
        out["verbosity"] = verbosity_label(answer)
    return out
