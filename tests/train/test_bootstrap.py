"""`bootstrap`: sample under varied attributes, re-label with the reward model, fine-tune again."""

from __future__ import annotations

import json

from click.testing import CliRunner

from steer_train.__main__ import cli
from steerlm.reward import load_reward_model
from steerlm.spec import load_spec
from steerlm.template import Turn


def test_bootstrap_relabels_samples_with_the_rm_and_fine_tunes(steer_sft, trained_rm, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("question 200\nquestion 201\nquestion 202\n")
    out = tmp_path / "boot"
    res = CliRunner().invoke(cli, [
        "bootstrap", "--model", str(steer_sft), "--reward-model", str(trained_rm), "--prompts", str(prompts),
        "--samples-per-prompt", "2", "--vary", "verbosity", "--max-new-tokens", "24", "--out", str(out),
        "--seq-len", "256", "--lr", "1e-3", "--max-steps", "2", "--warmup", "1", "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "bootstrap.jsonl").read_text().splitlines()]
    sampled = [json.loads(line) for line in (out / "bootstrap_attributes.jsonl").read_text().splitlines()]
    assert rows and [r["id"] for r in rows] == [s["id"] for s in sampled]
    assert all(set(s["sampled_with"]) == {"verbosity"} for s in sampled)
    scorer = load_reward_model(trained_rm)
    for row in rows:
        user, bot = row["conversations"]
        assert user["value"].startswith("question 20")
        expected = scorer.labels(scorer.score([[Turn(user["value"], bot["value"])]], row["system"])[0])
        assert bot["label"] == expected
    assert load_spec(out).kind == "generator" and (out / "model.safetensors").is_file()


def test_bootstrap_rejects_unknown_attribute_names(steer_sft, trained_rm, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("q\n")
    res = CliRunner().invoke(cli, ["bootstrap", "--model", str(steer_sft), "--reward-model", str(trained_rm),
                                   "--prompts", str(prompts), "--vary", "wit", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "unknown attribute 'wit'" in res.output
