"""Fixtures of the integration tests: checkpoints made by the real training CLI (`python -m steer_train`).

The generator is fine-tuned from a base carrying the 7-attribute 0..9 SteerLM-13B schema, so a component that
fell back to the default HelpSteer schema instead of reading the checkpoint's own would be caught.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from steer_train.__main__ import cli
from steerlm.schema import STEERLM_13B
from tests.train.traindata import length_rows, write_conversations


def run_cli(args: list) -> None:
    """`python -m steer_train ARGS` in this process; fails the test with the command's output and traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code != 0:
        raise AssertionError(f"steer_train {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}"
                             ) from result.exception


def creativity_rows(n: int) -> list[tuple[str, str, str]]:
    """Single-turn rows in the 13B schema: creativity 1 -> a one-word answer, creativity 8 -> eight words."""
    return [(f"question {i}", "ok" if i % 2 == 0 else " ".join(["la"] * 8),
             STEERLM_13B.encode({"creativity": 1 if i % 2 == 0 else 8})) for i in range(n)]


@pytest.fixture(scope="session")
def sft_model(tiny_model_13b, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("it_sft")
    data = write_conversations(root / "train.jsonl", creativity_rows(8))
    out = root / "sft"
    run_cli(["sft", "--model", tiny_model_13b, "--data", data, "--out", out, "--seq-len", 256, "--max-steps", 4,
             "--warmup", 1, "--lr", "3e-3", "--no-progress"])
    return out


@pytest.fixture(scope="session")
def reward_model(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("it_rm")
    data = write_conversations(root / "train.jsonl", length_rows(16, 1))
    out = root / "rm"
    run_cli(["rm", "--model", tiny_model, "--data", data, "--out", out, "--batch-size", 8, "--max-steps", 3,
             "--warmup", 1, "--lr", "3e-3", "--max-length", 256, "--no-progress"])
    return out
