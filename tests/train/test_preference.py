"""HelpSteer2-Preference pairs and NeMo-Aligner's Bradley-Terry losses.

Upstream (NVIDIA/NeMo-Aligner d3493c75, PR #361):
- nemo_aligner/models/nlp/gpt/megatron_gpt_regression_reward_model.py `bt_loss_func`: strength < 0 -> response 1
  chosen, else response 2; margin = |strength|; regular_bt -logsig(c - r), margin_bt -logsig(c - r - m),
  scaled_bt m * -logsig(c - r).
- examples/nlp/data/steerlm/preprocess_helpsteer2_data.py: the preference rows carry prompt, response_1,
  response_2, preference_strength and split.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from click.testing import CliRunner

from steer_train.__main__ import cli
from steer_train.data import DataError
from steer_train.preference import bt_loss, load_pairs, pair_from_helpsteer2
from steerlm.schema import HELPSTEER


def test_bt_losses_match_the_upstream_formulas():
    chosen, rejected, margin = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0]), torch.tensor([3.0, 1.0])
    logsig = [math.log(1 / (1 + math.exp(-x))) for x in (1.5, -2.0)]
    assert bt_loss("regular_bt", chosen, rejected, margin).tolist() == pytest.approx([-logsig[0], -logsig[1]])
    shifted = [math.log(1 / (1 + math.exp(-x))) for x in (1.5 - 3.0, -2.0 - 1.0)]
    assert bt_loss("margin_bt", chosen, rejected, margin).tolist() == pytest.approx([-shifted[0], -shifted[1]])
    assert bt_loss("scaled_bt", chosen, rejected, margin).tolist() == pytest.approx([-3 * logsig[0], -1 * logsig[1]])
    with pytest.raises(ValueError, match="regular_bt, margin_bt, scaled_bt"):
        bt_loss("hinge", chosen, rejected, margin)


@pytest.mark.parametrize("strength, chosen, margin", [(-3, "one", 3.0), (-1, "one", 1.0), (0, "two", 0.0), (2, "two", 2.0)])
def test_the_sign_of_the_preference_strength_picks_the_chosen_answer(strength, chosen, margin):
    row = {"prompt": "q", "response_1": "one", "response_2": "two", "preference_strength": strength, "split": "train"}
    pair, split = pair_from_helpsteer2(row, "p")
    assert (pair.chosen.turns[-1].answer, pair.margin, split) == (chosen, margin, "train")
    assert pair.rejected.turns[-1].answer == ({"one", "two"} - {chosen}).pop()


def test_bad_strength_is_a_clear_error():
    with pytest.raises(DataError, match="preference_strength.*-3..3"):
        pair_from_helpsteer2({"prompt": "q", "response_1": "a", "response_2": "b", "preference_strength": 5}, "p")


def planted_rows(n: int, seed: int, split: str) -> list[dict]:
    """Response with more words is preferred, by 1..3 with the length gap (the planted signal)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(range(1, 25), 2)
        strength = max(1, min(3, abs(a - b) // 5 + 1)) * (1 if b > a else -1)
        rows.append({"prompt": f"q{seed}-{i}", "response_1": " ".join(["la"] * a), "response_2": " ".join(["la"] * b),
                     "preference_strength": strength, "split": split})
    return rows


def test_prepare_writes_pairs_split_by_the_files_split_column(tmp_path):
    src = tmp_path / "preference.jsonl"
    rows = planted_rows(6, 0, "train") + planted_rows(2, 1, "validation")
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(cli, ["prepare", "--input", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    train, val = (load_pairs(tmp_path / "out" / f"{s}.jsonl", HELPSTEER) for s in ("train", "val"))
    assert (len(train), len(val)) == (6, 2)
    for pair, row in zip(train, rows):
        longer = max(row["response_1"], row["response_2"], key=len)
        assert pair.chosen.turns[0].answer == longer and pair.margin == abs(row["preference_strength"])


def test_rm_with_scaled_bt_learns_planted_preferences(tiny_model, tmp_path):
    """Also the reward model under FSDP2 in one process: sharded training, gathered reward-layout export."""
    from steer_train.config import RMConfig
    from steer_train.preference import read_helpsteer2_preference, write_pairs
    from steer_train.rm import train

    for name, rows in (("train", planted_rows(48, 2, "train")), ("val", planted_rows(24, 3, "validation"))):
        src = tmp_path / f"{name}.src.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_pairs(tmp_path / f"{name}.jsonl", read_helpsteer2_preference(src)[0])
    out = train(RMConfig(model=str(tiny_model), data=str(tmp_path / "train.jsonl"), val_data=str(tmp_path / "val.jsonl"),
                         out=str(tmp_path / "rm"), loss="scaled_bt", batch_size=8, lr=5e-3, epochs=4, warmup=2,
                         max_length=128, progress=False, attribute_weights="helpfulness=1", parallel="fsdp",
                         device="cpu"))
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] == 24 and report["accuracy"] >= 0.9, report
    assert json.loads((out / "steerlm.json").read_text())["attribute_weights"] == {"helpfulness": 1.0}
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["parallel"] == "fsdp"
