"""Planted-signal conversation data for the training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from steerlm.schema import HELPSTEER


def write_conversations(path: Path, rows: list[tuple[str, str, str]], system: str | None = "") -> Path:
    """rows: (question, answer, label string) as single-turn NeMo-Aligner conversations."""
    with path.open("w") as f:
        for i, (q, a, label) in enumerate(rows):
            conv = [{"from": "User", "value": q, "label": None}, {"from": "Assistant", "value": a, "label": label}]
            f.write(json.dumps({"id": f"c{i}", "system": system, "conversations": conv}) + "\n")
    return path


def length_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """Answers of 1..40 words whose verbosity label is a function of their length (the planted signal)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 40)
        rows.append((f"question {seed}-{i}", " ".join(["la"] * k), f"verbosity:{min(4, k // 9)}"))
    return rows


def steer_rows(n: int) -> list[tuple[str, str, str]]:
    """verbosity 0 -> a one-word answer, verbosity 4 -> sixteen words; full label strings as annotate writes them."""
    return [
        (f"question {i}", "ok" if i % 2 == 0 else " ".join(["la"] * 16), HELPSTEER.encode({"verbosity": 0 if i % 2 == 0 else 4}))
        for i in range(n)
    ]
