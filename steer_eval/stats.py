"""Statistics of steerability (numpy only; no models here, so they test on planted data; reward-model
quality is `steer_train.quality`).

Steerability of one attribute: answers were generated with that attribute requested at each value of
its scale (the others at their defaults) and measured by the reward model.
- spearman: rank correlation between requested and measured value over all answers;
- mae: mean |measured - requested|, the measurement clamped to the attribute's range first;
- monotonic: the mean measured value rises strictly with every step of the requested value;
- side effects: for every other measured attribute, the range (max - min) of its per-value means
  across the sweep; an attribute that steers cleanly leaves the others flat.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from steer_train.quality import undefined_correlation


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho; None when either side is constant, where it is undefined."""
    if undefined_correlation(x, y):
        return None
    return float(stats.spearmanr(x, y).statistic)


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
