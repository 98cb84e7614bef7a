"""What the training tests read back from a run, and how they interrupt one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

import steer_train.checkpoint as checkpoint


def losses(out: Path) -> list[float]:
    """The training loss of every step, from OUT/metrics.jsonl."""
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train_until_crash(monkeypatch, train: Callable, cfg, step: int) -> None:
    """Run train(cfg), killed (KeyboardInterrupt) right after the step-`step` checkpoint is written."""
    original = checkpoint.save_checkpoint

    def save_then_crash(out, at, state, keep):
        path = original(out, at, state, keep)
        if at == step:
            raise KeyboardInterrupt(f"killed right after the step-{step} checkpoint")
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        monkeypatch.setattr(checkpoint, "save_checkpoint", original)
