"""Evaluation outputs: Markdown tables and the steerability PNG (JSON and text go through `steerlm.files`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from steer_train.quality import fmt


def steer_table(summaries: Sequence[Mapping]) -> str:
    """Markdown table, one row per swept attribute."""
    rows = [
        "| attribute | Spearman | MAE | monotonic | mean measured per requested value | largest side effect |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        means = ", ".join(f"{v}: {fmt(m['mean'])}" for v, m in s["mean_by_value"].items())
        side = s["max_side_effect"]
        side_text = f"{side['attribute']} moves {fmt(side['range'])}" if side else "n/a"
        rows.append(
            f"| {s['attribute']} | {fmt(s['spearman'])} | {fmt(s['mae'])} | {'yes' if s['monotonic'] else 'no'} "
            f"| {means} | {side_text} |"
        )
    return "\n".join(rows) + "\n"


def steer_plot(
    path: str | os.PathLike,
    summaries: Sequence[Mapping],
    points: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    value_ranges: Mapping[str, tuple[int, int]],
    title: str = "",
) -> Path:
    """One panel per attribute: every answer's measured value (jittered dots), mean +- std per requested value,
    and the diagonal a perfectly steered attribute would follow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(summaries)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, s in zip(axes[0], summaries):
        name = s["attribute"]
        lo, hi = value_ranges[name]
        req, meas = (np.asarray(a, dtype=float) for a in points[name])
        ax.plot([lo, hi], [lo, hi], "--", color="grey", lw=1, label="ideal")
        ax.scatter(req + rng.uniform(-0.12, 0.12, len(req)), meas, s=10, alpha=0.35, color="tab:blue", label="answers")
        xs = [int(v) for v in s["mean_by_value"]]
        mean = [m["mean"] for m in s["mean_by_value"].values()]
        std = [m["std"] for m in s["mean_by_value"].values()]
        ax.errorbar(xs, mean, yerr=std, color="tab:red", marker="o", capsize=3, label="mean ± std")
        ax.set_title(f"{name}: Spearman {fmt(s['spearman'])}, MAE {fmt(s['mae'])}")
        ax.set_xlabel("requested")
        ax.set_ylabel("measured by reward model")
        ax.set_xticks(range(lo, hi + 1))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
