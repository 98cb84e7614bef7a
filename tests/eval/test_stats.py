"""Steerability and reward-model statistics on planted data whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from steer_eval.stats import spearman, steerability
from steer_train.quality import rm_quality

VALUES = np.repeat(np.arange(5), 20)  # 20 answers requested at each value 0..4


def test_a_perfectly_steered_attribute_has_spearman_one_zero_error_and_a_monotonic_mean():
    s = steerability(VALUES, {"verbosity": VALUES.astype(float)}, "verbosity", (0, 4))
    assert s["spearman"] == pytest.approx(1.0)
    assert s["mae"] == pytest.approx(0.0)
    assert s["monotonic"] is True
    assert [m["mean"] for m in s["mean_by_value"].values()] == [0, 1, 2, 3, 4]


def test_an_attribute_that_does_not_steer_has_spearman_near_zero_and_no_monotonic_mean():
    rng = np.random.default_rng(1)
    noise = rng.uniform(0, 4, len(VALUES))
    s = steerability(VALUES, {"verbosity": noise}, "verbosity", (0, 4))
    assert abs(s["spearman"]) < 0.25
    assert s["monotonic"] is False


def test_a_constant_measurement_has_undefined_spearman_not_zero():
    s = steerability(VALUES, {"verbosity": np.full(len(VALUES), 2.0)}, "verbosity", (0, 4))
    assert s["spearman"] is None
    assert s["mae"] == pytest.approx(np.abs(2 - VALUES).mean())


def test_mae_clamps_the_measurement_to_the_scale_first():
    s = steerability(VALUES, {"verbosity": VALUES + 10.0}, "verbosity", (0, 4))
    assert s["mae"] == pytest.approx(np.abs(4 - VALUES).mean())


def test_side_effects_name_the_other_attribute_that_moves_with_the_sweep():
    rng = np.random.default_rng(2)
    measured = {
        "verbosity": VALUES.astype(float),
        "complexity": 0.5 * VALUES + rng.normal(0, 0.05, len(VALUES)),  # dragged along: moves ~2 over the sweep
        "creativity": 1.0 + rng.normal(0, 0.05, len(VALUES)),  # untouched
    }
    s = steerability(VALUES, measured, "verbosity", (0, 4))
    assert s["max_side_effect"]["attribute"] == "complexity"
    assert s["side_effects"]["complexity"]["range"] == pytest.approx(2.0, abs=0.1)
    assert s["side_effects"]["creativity"]["range"] < 0.15


def test_spearman_is_rank_based():
    x = np.arange(10)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


def _planted_rm_rows():
    # Two prompts with three answers each; labels 0..2 for one attribute, the other missing on one row.
    labels = np.array([[0, 1], [1, np.nan], [2, 3], [0, 0], [2, 2], [1, 1]], dtype=float)
    groups = ["a", "a", "a", "b", "b", "b"]
    return labels, groups


def test_rm_quality_of_a_perfect_predictor():
    labels, groups = _planted_rm_rows()
    m = rm_quality(labels, np.nan_to_num(labels, nan=9.0), groups, ["verbosity", "complexity"])
    assert m["verbosity"] == {"n": 6, "mae": 0.0, "pearson": pytest.approx(1.0), "pairs": 6, "pairwise_accuracy": 1.0}
    # The missing complexity label is left out of every metric (and of every pair).
    assert m["complexity"]["n"] == 5 and m["complexity"]["pairs"] == 4
    assert m["complexity"]["mae"] == 0.0


def test_rm_quality_of_a_reversed_predictor_ranks_every_pair_wrong():
    labels, groups = _planted_rm_rows()
    m = rm_quality(labels, -np.nan_to_num(labels), groups, ["verbosity", "complexity"])
    assert m["verbosity"]["pairwise_accuracy"] == 0.0
    assert m["verbosity"]["pearson"] == pytest.approx(-1.0)
    assert m["verbosity"]["mae"] == pytest.approx(np.mean(2 * labels[:, 0]))


def test_rm_quality_counts_a_tied_prediction_as_half_right():
    labels = np.array([[0.0], [4.0]])
    m = rm_quality(labels, np.array([[2.0], [2.0]]), ["p", "p"], ["verbosity"])
    assert m["verbosity"]["pairwise_accuracy"] == 0.5
    assert m["verbosity"]["pearson"] is None


def test_rm_quality_only_pairs_answers_to_the_same_prompt():
    labels = np.array([[0.0], [4.0]])
    m = rm_quality(labels, np.array([[3.0], [1.0]]), ["p", "q"], ["verbosity"])
    assert m["verbosity"]["pairs"] == 0 and m["verbosity"]["pairwise_accuracy"] is None
