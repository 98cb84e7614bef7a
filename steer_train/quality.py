"""How well a reward model predicts labels: per-attribute MAE, Pearson r and pairwise accuracy.

One set of metrics for the whole package: `rm` reports it on `--val-data` (eval.json), and
`python -m steer_eval rm-eval` on any labelled conversation file.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np
from scipy import stats

from steer_train.annotate import Scorer
from steer_train.data import Conversation
from steerlm.schema import AttributeSchema


def undefined_correlation(x: Sequence[float], y: Sequence[float]) -> bool:
    """A correlation is undefined with fewer than two points or a constant side."""
    return len(x) < 2 or np.ptp(np.asarray(x, dtype=float)) == 0 or np.ptp(np.asarray(y, dtype=float)) == 0


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    if undefined_correlation(x, y):
        return None
    return float(stats.pearsonr(x, y).statistic)


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


def rm_eval(scorer: Scorer, schema: AttributeSchema, conversations: Sequence[Conversation],
            batch_size: int = 8) -> dict[str, dict]:
    """`rm_quality` of `scorer` (predicting `schema`'s attributes) on labelled conversations: every assistant
    turn with labels is one row, scored with its conversation up to that turn; rows answering the same prompt
    (same question after the same earlier turns) form the groups for pairwise accuracy."""
    convs, labels, groups = [], [], []
    for conv in conversations:
        for i, turn in enumerate(conv.turns):
            values = schema.parse(turn.labels)
            if not values:
                continue
            convs.append((list(conv.turns[: i + 1]), conv.system))
            labels.append([values.get(n, np.nan) for n in schema.names])
            groups.append(json.dumps([[t.question, t.answer] for t in conv.turns[:i]] + [turn.question]))
    if not convs:
        raise ValueError("no labelled assistant turns to evaluate the reward model on")
    scores = scorer.score([c for c, _ in convs], system=[s for _, s in convs], batch_size=batch_size)
    return rm_quality(np.array(labels, dtype=float), scores, groups, schema.names)


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for tables; undefined statistics print as n/a rather than a misleading 0."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def rm_table(metrics: dict[str, dict]) -> str:
    """Markdown table of `rm_quality`, attributes without labelled rows left out."""
    rows = ["| attribute | labelled rows | MAE | Pearson r | pairs | pairwise accuracy |", "|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        if not m["n"]:
            continue
        rows.append(
            f"| {name} | {m['n']} | {fmt(m['mae'])} | {fmt(m['pearson'])} | {m['pairs']} "
            f"| {fmt(m['pairwise_accuracy'])} |"
        )
    return "\n".join(rows) + "\n"
