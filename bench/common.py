"""What every benchmark script shares: machine/date, repeats -> min/median/max, tables, results.json, BENCHMARKS.md.

Absolute figures on a shared machine are noise, so every figure a script reports is a ratio against a baseline
measured in the same script and the same repeat, summarised over repeats as min/median/max. A metric is stored as
{"min", "median", "max", "n", "unit", "better"} ("better": "higher" or "lower"), which is what `bench/compare.py`
reads to flag regressions beyond the measured spread.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]


def passive_omp() -> None:
    """Make idle OpenMP threads sleep instead of spin, in this process and the servers it starts.

    Call before torch is imported. On a small shared machine the default spin-wait of idle OpenMP workers
    competes with the thread that has work: on 2 cores a 1-token request to the engine (model loaded on the main
    thread, run on its own thread) took 0.58 s by default and 0.004 s with OMP_WAIT_POLICY=PASSIVE. Every side of
    a comparison runs with the same setting (child processes inherit it)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


RESULTS = ROOT / "bench" / "results.json"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine() -> dict[str, Any]:
    """The facts that make a figure reproducible: CPU, cores, memory, versions, commit, UTC date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": _git_commit(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine_line(info: Mapping[str, Any]) -> str:
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    return (f"{info.get('cpu')}, {info.get('cores')} cores, {info.get('memory_gib')} GiB{gpu}; "
            f"Python {info.get('python')}, torch {info.get('torch', '-')}; commit {info.get('commit')}; "
            f"{info.get('date_utc')} UTC")


def summarize(values: Iterable[float], unit: str = "x", better: str = "higher") -> dict[str, Any]:
    """min/median/max of repeated measurements (the spread is what compare.py trusts)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize needs at least one value")
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals),
            "unit": unit, "better": better}


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-repeat ratios: repeat i of the measurement over repeat i of its baseline (run next to each other,
    so both saw the same machine load)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} measurements against {len(denominators)} baselines")
    return [n / d for n, d in zip(numerators, denominators)]


def repeat(fn: Callable[[int], Mapping[str, float]], repeats: int) -> dict[str, list[float]]:
    """Call fn(repeat_index) `repeats` times; each call returns named figures; returns name -> list of values."""
    out: dict[str, list[float]] = {}
    for r in range(repeats):
        for name, value in fn(r).items():
            out.setdefault(name, []).append(float(value))
    return out


def fmt(stat: Mapping[str, Any], digits: int = 2) -> str:
    """'3.10 (2.90-3.40)' for median (min-max)."""
    f = f"{{:.{digits}f}}"
    if stat["n"] == 1:
        return f.format(stat["median"])
    return f"{f.format(stat['median'])} ({f.format(stat['min'])}-{f.format(stat['max'])})"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (what is printed is what goes into BENCHMARKS.md)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that reruns this benchmark from the repository root (`script` may be bench/NAME.py or a module)."""
    args = list(sys.argv[1:] if argv is None else argv)
    module = script.removesuffix(".py").replace("/", ".")
    return " ".join([".venv/bin/python", "-m", module, *(shlex.quote(a) for a in args)])


def record(name: str, *, command: str, info: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]],
           markdown: str, extra: Mapping[str, Any] | None = None, out: str | os.PathLike | None = None,
           results: Path | None = None, benchmarks_md: Path | None = None) -> dict[str, Any]:
    """Print the section, store it under `name` in results.json and between markers in BENCHMARKS.md
    (the recorded bench/results.json and ./BENCHMARKS.md, or OUT/results.json and OUT/BENCHMARKS.md)."""
    if out is not None:
        results, benchmarks_md = Path(out) / "results.json", Path(out) / "BENCHMARKS.md"
    import fcntl

    from steerlm.files import write_atomic, write_json

    section = {"command": command, "machine": dict(info), "metrics": dict(metrics), **(extra or {})}
    results = results or RESULTS
    md = benchmarks_md or BENCHMARKS_MD
    body = f"`{command}`\n\nMachine: {machine_line(info)}.\n\n{markdown.strip()}\n"
    print(body, flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    # Scripts run side by side may finish together: one read-modify-write of both files at a time.
    with open(results.parent / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(results.read_text()) if results.exists() else {}
        data.setdefault("benchmarks", {})[name] = section
        write_json(results, data)
        text = md.read_text() if md.exists() else "# Benchmarks\n"
        write_atomic(md, replace_section(text, name, body))
    return section


def out_option(fn):
    """--out DIR: where a run writes results.json and BENCHMARKS.md (default: the recorded ones in the repo)."""
    import click

    return click.option("--out", type=click.Path(file_okay=False), default=None,
                        help="Write DIR/results.json and DIR/BENCHMARKS.md instead of the recorded "
                             "bench/results.json and BENCHMARKS.md (a run to compare with `make bench-compare`).")(fn)


def replace_section(text: str, name: str, body: str) -> str:
    """Put `body` between `<!-- name:begin -->` and `<!-- name:end -->`, appending the markers if absent."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def not_available(what: str, why: str) -> dict[str, Any]:
    """A row that says plainly that a piece is missing from this checkout (no figure is invented for it)."""
    return {"available": False, "what": what, "why": why}
