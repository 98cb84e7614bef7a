"""`python -m steer_eval eval` and `rm-eval` end to end on tiny models made by the tests."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from steer_eval.__main__ import cli


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": "a", "question": "Where did techno originate?"}, {"prompt": "Explain rain."}, {"turns": ["Hi", "x"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_sweeps_each_attribute_and_writes_json_markdown_and_plot(tiny_model, tiny_rm, prompts_file, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, [
        "eval", "--model", str(tiny_model), "--reward-model", str(tiny_rm), "--prompts", str(prompts_file),
        "--attributes", "verbosity,complexity", "--values", "0,2,4", "--max-tokens", "6", "--limit", "2",
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert [s["attribute"] for s in report["summaries"]] == ["verbosity", "complexity"]
    # 2 prompts x 3 values per attribute, every answer scored on all nine attributes of the reward model.
    assert len(report["records"]) == 2 * 3 * 2
    first = report["records"][0]
    assert first["attributes"]["complexity"] == 4 and first["attributes"]["verbosity"] == 0  # others at defaults
    assert len(first["scores"]) == 9
    for s in report["summaries"]:
        assert s["values"] == [0, 2, 4] and set(s["side_effects"]) == {
            "quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence", "complexity",
            "verbosity",
        } - {s["attribute"]}
    table = (out / "eval.md").read_text()
    assert "| verbosity |" in table and "| complexity |" in table
    assert "| verbosity |" in result.output
    with Image.open(out / "eval.png") as img:
        assert img.width > 2 * img.height  # one panel per attribute, side by side


def test_eval_default_attributes_are_the_user_facing_ones(tiny_model):
    from steer_eval.steerability import choose_attributes
    from steerlm.schema import STEERLM_13B
    from steerlm.spec import load_spec

    assert choose_attributes(load_spec(tiny_model).schema, None) == ["creativity", "complexity", "verbosity"]
    assert choose_attributes(STEERLM_13B, None) == ["creativity"]


def test_eval_rejects_an_unknown_attribute_or_value_naming_the_allowed_ones(tiny_model, tiny_rm):
    runner = CliRunner()
    bad_attr = runner.invoke(cli, ["eval", "--model", str(tiny_model), "--reward-model", str(tiny_rm),
                                   "--attributes", "sarcasm"])
    assert bad_attr.exit_code == 2 and "unknown attribute 'sarcasm'" in bad_attr.output and "verbosity" in bad_attr.output
    bad_value = runner.invoke(cli, ["eval", "--model", str(tiny_model), "--reward-model", str(tiny_rm),
                                    "--attributes", "verbosity", "--values", "0,7"])
    assert bad_value.exit_code == 2 and "outside allowed range 0..4" in bad_value.output


def labelled_file(path):
    """Two prompts with three answers each, labelled by length: 1, 40 and 90 words."""
    rows = []
    for q in ("Name a colour.", "Name a fruit."):
        for n, v in ((1, 0), (40, 1), (90, 2)):
            answer = " ".join(["word"] * n)
            rows.append({"system": None, "conversations": [
                {"from": "User", "value": q, "label": None},
                {"from": "Assistant", "value": answer, "label": f"verbosity:{v}"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rm_eval_reports_each_labelled_attribute(tiny_rm, tmp_path):
    data = labelled_file(tmp_path / "val.jsonl")
    result = CliRunner().invoke(cli, ["rm-eval", "--reward-model", str(tiny_rm), "--data", str(data),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "rm_eval.json").read_text())
    assert metrics["verbosity"]["n"] == 6 and metrics["verbosity"]["pairs"] == 6  # 3 pairs per prompt
    assert metrics["quality"]["n"] == 0  # unlabelled attributes are not scored
    assert "| verbosity | 6 |" in result.output and "| quality |" not in result.output


def test_the_old_steer_train_command_says_where_it_moved_and_runs_it(tiny_rm, tmp_path):
    from steer_train.__main__ import cli as train_cli

    args = ["rm-eval", "--reward-model", str(tiny_rm), "--data", str(labelled_file(tmp_path / "val.jsonl"))]
    new, old = CliRunner().invoke(cli, args), CliRunner().invoke(train_cli, args)
    assert old.exit_code == 0, old.output
    assert "`python -m steer_train rm-eval` is now `python -m steer_eval rm-eval`" in old.stderr
    assert old.stdout == new.stdout
    bad = CliRunner().invoke(train_cli, ["rm-eval", "--batch-size", "x"])
    assert bad.exit_code == 2 and "python -m steer_eval rm-eval" in bad.output


def test_eval_through_the_served_ensemble_over_grpc(tiny_model, tiny_rm, prompts_file, tmp_path):
    from steerlm.serve import TritonServer

    out = tmp_path / "eval"
    with TritonServer(tiny_model) as server:
        result = CliRunner().invoke(cli, [
            "eval", "--model", str(tiny_model), "--reward-model", str(tiny_rm), "--prompts", str(prompts_file),
            "--attributes", "verbosity", "--values", "0,4", "--max-tokens", "5", "--server", server.grpc_url,
            "--out", str(out),
        ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert len(report["records"]) == 3 * 2
    assert all(isinstance(r["answer"], str) for r in report["records"])
    assert (out / "eval.png").stat().st_size > 0
