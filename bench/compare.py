"""Compare a new benchmark run with the recorded one; flag regressions beyond the measured spread.

    .venv/bin/python -m bench.compare --baseline bench/results.json --new runs/bench/results.json

A metric regresses when its new median is worse than the recorded median by more than the larger of the two
runs' spreads (max - min over repeats): a shift the repeats themselves never showed. Exit code 1 when any
metric regressed, so CI can gate on it; metrics present in only one run are listed, not judged.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import click

from bench.common import table


@dataclass(frozen=True)
class Verdict:
    name: str  # "benchmark/metric"
    old: float | None
    new: float | None
    spread: float
    status: str  # "regressed" | "improved" | "same" | "only-old" | "only-new"


def judge(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """'regressed', 'improved' or 'same' for one metric of both runs (same "better" direction)."""
    better = old.get("better", "higher")
    if better != new.get("better", better):
        raise ValueError(f"metric changed direction: {better!r} -> {new.get('better')!r}")
    spread = max(old["max"] - old["min"], new["max"] - new["min"])
    delta = new["median"] - old["median"]
    if better == "lower":
        delta = -delta
    if delta < -spread:
        return "regressed"
    if delta > spread:
        return "improved"
    return "same"


def compare(old_run: Mapping[str, Any], new_run: Mapping[str, Any]) -> list[Verdict]:
    """Verdicts for every metric of every benchmark in either run."""
    out = []
    old_b, new_b = old_run.get("benchmarks", {}), new_run.get("benchmarks", {})
    for bench in sorted(set(old_b) | set(new_b)):
        om = old_b.get(bench, {}).get("metrics", {})
        nm = new_b.get(bench, {}).get("metrics", {})
        for metric in sorted(set(om) | set(nm)):
            o, n = om.get(metric), nm.get(metric)
            name = f"{bench}/{metric}"
            if o is None or n is None:
                out.append(Verdict(name, o and o["median"], n and n["median"], 0.0, "only-new" if o is None else "only-old"))
                continue
            spread = max(o["max"] - o["min"], n["max"] - n["min"])
            out.append(Verdict(name, o["median"], n["median"], spread, judge(o, n)))
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False), default="bench/results.json",
              show_default=True, help="The recorded run.")
@click.option("--new", "new_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="The run to judge (results.json written by `make bench` with BENCH_OUT=...).")
@click.option("--all", "show_all", is_flag=True, help="List unchanged metrics too.")
def main(baseline: str, new_path: str, show_all: bool) -> None:
    """Flag metrics whose median moved the wrong way by more than the spread over repeats."""
    verdicts = compare(json.loads(Path(baseline).read_text()), json.loads(Path(new_path).read_text()))
    shown = [v for v in verdicts if show_all or v.status != "same"]
    rows = [(v.name, "-" if v.old is None else f"{v.old:.3g}", "-" if v.new is None else f"{v.new:.3g}",
             f"{v.spread:.3g}", v.status) for v in shown]
    click.echo(table(["metric", "recorded median", "new median", "spread", "verdict"], rows) if rows
               else "no metric moved beyond its spread")
    regressed = [v.name for v in verdicts if v.status == "regressed"]
    if regressed:
        click.echo(f"\n{len(regressed)} regression(s): {', '.join(regressed)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
