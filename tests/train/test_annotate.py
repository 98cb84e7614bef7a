"""`annotate`: every assistant turn labelled by the reward model; a crashed run resumes without duplicates."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from steer_train.__main__ import cli
from steer_train.annotate import annotate
from steerlm.reward import load_reward_model
from steerlm.template import Turn
from tests.train.traindata import length_rows, write_conversations


def two_turn_file(path, n):
    with path.open("w") as f:
        for i in range(n):
            conv = [{"from": "User", "value": f"q{i}", "label": None},
                    {"from": "Assistant", "value": " ".join(["la"] * (i % 40 + 1)), "label": None},
                    {"from": "User", "value": "more", "label": None},
                    {"from": "Assistant", "value": "la", "label": "verbosity:4"}]
            f.write(json.dumps({"id": f"c{i}", "system": "", "conversations": conv}) + "\n")
    return path


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_assistant_turn_gets_the_clamped_rounded_rm_labels(tmp_path, trained_rm):
    src = two_turn_file(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(cli, ["annotate", "--input", str(src), "--reward-model", str(trained_rm), "--out", str(out),
                                   "--batch-size", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    scorer = load_reward_model(trained_rm)
    schema = scorer.spec.schema
    for row in lines(out):
        msgs = row["conversations"]
        turns = [Turn(msgs[i]["value"], msgs[i + 1]["value"]) for i in range(0, len(msgs), 2)]
        for t in range(len(turns)):
            expected = schema.encode(schema.from_scores(scorer.score([turns[: t + 1]], "")[0]))
            assert msgs[2 * t + 1]["label"] == expected
        assert [m["label"] for m in msgs[0::2]] == [None, None]
    assert not (tmp_path / "out.jsonl.partial").exists()


class Crash(RuntimeError):
    pass


def test_rerun_after_crash_continues_and_never_duplicates(tmp_path, trained_rm):
    src = write_conversations(tmp_path / "in.jsonl", length_rows(10, 5))
    scorer = load_reward_model(trained_rm)
    clean = tmp_path / "clean.jsonl"
    annotate(src, clean, scorer, scorer.spec.schema, batch_size=3, progress=False)

    class CrashOnThirdBatch:
        calls = 0

        def score(self, *args, **kw):
            self.calls += 1
            if self.calls == 3:
                raise Crash("power cut")
            return scorer.score(*args, **kw)

    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        annotate(src, out, CrashOnThirdBatch(), scorer.spec.schema, batch_size=3, progress=False)
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists() and len(lines(partial)) == 6
    with partial.open("a") as f:  # a write torn by the crash
        f.write('{"id": "c6", "conv')

    seen = []

    class Recording:
        def score(self, conversations, *args, **kw):
            seen.extend(c[0].question for c in conversations)
            return scorer.score(conversations, *args, **kw)

    counts = annotate(src, out, Recording(), scorer.spec.schema, batch_size=3, progress=False)
    assert counts == {"conversations": 4, "turns": 4, "skipped_done": 6}
    assert seen == [f"question 5-{i}" for i in range(6, 10)]
    assert out.read_text() == clean.read_text()


def test_finished_output_is_not_overwritten(tmp_path, trained_rm):
    src = write_conversations(tmp_path / "in.jsonl", length_rows(2, 6))
    out = tmp_path / "out.jsonl"
    out.write_text("done\n")
    res = CliRunner().invoke(cli, ["annotate", "--input", str(src), "--reward-model", str(trained_rm), "--out", str(out)])
    assert res.exit_code == 1 and "already exists" in res.output
    assert out.read_text() == "done\n"


def test_annotate_needs_exactly_one_scorer(tmp_path):
    src = write_conversations(tmp_path / "in.jsonl", length_rows(1, 7))
    res = CliRunner().invoke(cli, ["annotate", "--input", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "exactly one of --reward-model" in res.output


def test_annotation_through_triton_matches_local_annotation(tmp_path, trained_rm):
    """`--server` sends concurrent requests to the served `reward_model` and writes the same labels."""
    from steerlm.serve import TritonServer

    src = two_turn_file(tmp_path / "in.jsonl", 6)
    scorer = load_reward_model(trained_rm)
    local = tmp_path / "local.jsonl"
    annotate(src, local, scorer, scorer.spec.schema, batch_size=4, progress=False)
    served = tmp_path / "served.jsonl"
    with TritonServer(reward_model_dir=trained_rm) as server:
        res = CliRunner().invoke(cli, ["annotate", "--input", str(src), "--server", f"http://{server.http_url}",
                                       "--out", str(served), "--concurrency", "4", "--batch-size", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert served.read_text() == local.read_text()
