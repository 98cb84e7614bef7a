"""Statistics of steerability and reward-model quality (numpy only; no models here, so they test on planted data).

Steerability of one attribute: answers were generated with that attribute requested at each value of
its scale (the others at their defaults) and measured by the reward model.
- spearman: rank correlation between requested and measured value over all answers;
- mae: mean |measured - requested|, the measurement clamped to the attribute's range first;
- monotonic: the mean measured value rises strictly with every step of the requested value;
- side effects: for every other measured attribute, the range (max - min) of its per-value means
  across the sweep; an attribute that steers cleanly leaves the others flat.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho; None when either side is constant, where it is undefined."""
    if _degenerate(x, y):
        return None
    return float(stats.spearmanr(x, y).statistic)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    if _degenerate(x, y):
        return None
    return float(stats.pearsonr(x, y).statistic)


def _degenerate(x: Sequence[float], y: Sequence[float]) -> bool:
    return len(x) < 2 or np.ptp(np.asarray(x, dtype=float)) == 0 or np.ptp(np.asarray(y, dtype=float)) == 0


def steerability(
    requested: Sequence[int],
    measured: Mapping[str, Sequence[float]],
    attribute: str,
    value_range: tuple[int, int],
) -> dict:
    """Summary of one attribute's sweep.

    `requested[i]` is the value asked for answer i; `measured[name][i]` the reward model's raw score of
    answer i for every attribute it measures (must include `attribute`)."""
    if attribute not in measured:
        raise ValueError(f"no measurement for attribute {attribute!r}; measured: {', '.join(measured)}")
    req = np.asarray(requested, dtype=float)
    lo, hi = value_range
    values = sorted(set(int(v) for v in req))
    own = np.asarray(measured[attribute], dtype=float)
    if own.shape != req.shape:
        raise ValueError(f"{attribute}: {len(own)} measurements for {len(req)} requests")
    per_value = {
        v: {"n": int((req == v).sum()), "mean": float(own[req == v].mean()), "std": float(own[req == v].std())}
        for v in values
    }
    means = [per_value[v]["mean"] for v in values]
    side = {}
    for name, scores in measured.items():
        if name == attribute:
            continue
        scores = np.asarray(scores, dtype=float)
        other_means = [float(scores[req == v].mean()) for v in values]
        side[name] = {
            "means": dict(zip(map(str, values), other_means)),
            "range": float(max(other_means) - min(other_means)),
            "spearman": spearman(req, scores),
        }
    worst = max(side, key=lambda n: side[n]["range"]) if side else None
    return {
        "attribute": attribute,
        "n": int(len(req)),
        "values": values,
        "spearman": spearman(req, own),
        "mae": float(np.abs(np.clip(own, lo, hi) - req).mean()),
        "monotonic": bool(len(means) > 1 and all(b > a for a, b in zip(means, means[1:]))),
        "mean_by_value": {str(v): per_value[v] for v in values},
        "side_effects": side,
        "max_side_effect": {"attribute": worst, "range": side[worst]["range"]} if worst else None,
    }


def rm_quality(
    labels: np.ndarray,
    predictions: np.ndarray,
    groups: Sequence[str],
    names: Sequence[str],
) -> dict[str, dict]:
    """Per-attribute reward-model quality on labelled rows.

    `labels` [n, n_attr] holds NaN where a label is missing; `predictions` [n, n_attr] raw scores;
    `groups[i]` identifies the prompt of row i. Pairwise accuracy: over every two answers to the same
    prompt whose labels differ, the share where the higher-labelled answer scores higher (a tie in
    score counts half)."""
    labels = np.asarray(labels, dtype=float)
    predictions = np.asarray(predictions, dtype=float)
    if labels.shape != predictions.shape or labels.shape[1] != len(names):
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must both be [n, {len(names)}]")
    groups = np.asarray(list(groups))
    out: dict[str, dict] = {}
    for j, name in enumerate(names):
        present = ~np.isnan(labels[:, j])
        y, p, g = labels[present, j], predictions[present, j], groups[present]
        correct = pairs = 0.0
        for group in np.unique(g):
            idx = np.flatnonzero(g == group)
            for a in range(len(idx)):
                for b in range(a + 1, len(idx)):
                    dy = y[idx[a]] - y[idx[b]]
                    if dy == 0:
                        continue
                    dp = p[idx[a]] - p[idx[b]]
                    pairs += 1
                    correct += 1.0 if dp * dy > 0 else 0.5 if dp == 0 else 0.0
        out[name] = {
            "n": int(present.sum()),
            "mae": float(np.abs(p - y).mean()) if len(y) else None,
            "pearson": pearson(y, p),
            "pairs": int(pairs),
            "pairwise_accuracy": correct / pairs if pairs else None,
        }
    return out


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for tables; undefined statistics print as n/a rather than a misleading 0."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"
