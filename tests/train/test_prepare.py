"""`prepare`: the public data schemas in, NeMo-Aligner conversation JSONL out."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from steer_train.__main__ import cli
from steer_train.data import DataError, read_conversations, split
from steerlm.schema import HELPSTEER

HS_COLUMNS = ["prompt", "response", "helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HS_COLUMNS)
        w.writerows(rows)
    return path


def test_helpsteer_csv_row_becomes_one_labelled_turn(tmp_path):
    path = write_csv(tmp_path / "hs.csv", [["What is 2+2?", "4.", 3, 4, 4, 0, 1]])
    [conv], skipped = read_conversations(path, HELPSTEER)
    assert skipped == 0
    assert [(t.question, t.answer, t.labels) for t in conv.turns] == [
        ("What is 2+2?", "4.", "helpfulness:3,correctness:4,coherence:4,complexity:0,verbosity:1")
    ]


def test_helpsteer2_multi_turn_prompt_is_split_into_earlier_turns(tmp_path):
    prompt = "Hi\n<extra_id_1>Assistant\nHello!\n<extra_id_1>User\nTell a joke"
    row = dict(zip(HS_COLUMNS, [prompt, "Why did...", 2, 2, 3, 1, 2]))
    path = tmp_path / "hs2.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [conv], _ = read_conversations(path, HELPSTEER)
    assert [(t.question, t.answer) for t in conv.turns] == [("Hi", "Hello!"), ("Tell a joke", "Why did...")]
    assert conv.turns[0].labels == "" and conv.turns[1].labels.endswith("verbosity:2")


def oasst_tree():
    return {"message_tree_id": "t", "prompt": {
        "message_id": "q1", "role": "prompter", "text": "Q1", "lang": "en", "replies": [
            {"message_id": "a1", "role": "assistant", "text": "A1",
             "labels": {"name": ["quality", "humor", "spam"], "value": [0.625, 0.1, 1.0], "count": [3, 3, 3]},
             "replies": [{"message_id": "q2", "role": "prompter", "text": "Q2", "replies": [
                 {"message_id": "a2", "role": "assistant", "text": "A2", "labels": {"name": ["creativity"], "value": [1.0]}}]}]},
            {"message_id": "a3", "role": "assistant", "text": "A3", "replies": [
                {"message_id": "q3", "role": "prompter", "text": "dangling question"}]}]}}


def flatten(node, parent=None):
    msg = {k: v for k, v in node.items() if k != "replies"} | {"parent_id": parent}
    return [msg] + [m for r in node.get("replies", []) for m in flatten(r, node["message_id"])]


@pytest.mark.parametrize("layout", ["trees", "messages"])
def test_oasst_threads_are_split_and_labels_mapped_to_0_4(tmp_path, layout):
    tree = oasst_tree()
    rows = [tree] if layout == "trees" else flatten(tree["prompt"])
    path = tmp_path / "oasst.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs, _ = read_conversations(path, HELPSTEER)
    threads = sorted([(t.question, t.answer, t.labels) for t in c.turns] for c in convs)
    # round(0.625 * 4) = 2 (banker's rounding of 2.5), round(0.1 * 4) = 0; `spam` is no schema attribute;
    # a thread ending in an unanswered question is cut after its last answer.
    assert threads == [
        [("Q1", "A1", "quality:2,humor:0"), ("Q2", "A2", "creativity:4")],
        [("Q1", "A3", "")],
    ]


def test_bad_row_error_names_file_and_line(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [["q", "a", 3, 3, 3, 3, 3], ["q2", "a2", 3, 3, 7, 3, 3]])
    with pytest.raises(DataError, match=r"bad\.csv:3: field 'coherence': '7' is not an integer in 0\.\.4"):
        read_conversations(path, HELPSTEER)


def test_nemo_conversation_with_unknown_attribute_is_rejected(tmp_path):
    path = tmp_path / "c.jsonl"
    conv = {"conversations": [{"from": "User", "value": "q"}, {"from": "Assistant", "value": "a", "label": "wit:3"}]}
    path.write_text(json.dumps(conv) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1: conversations\[1\]\.label: unknown attribute 'wit'"):
        read_conversations(path, HELPSTEER)


def test_cli_skip_invalid_counts_and_split_is_seeded(tmp_path):
    rows = [[f"q{i}", f"a{i}", 3, 3, 3, 3, i % 5] for i in range(40)] + [["q", "a", "x", 3, 3, 3, 3]]
    src = write_csv(tmp_path / "hs.csv", rows)
    runner = CliRunner()
    failed = runner.invoke(cli, ["prepare", "--input", str(src), "--out", str(tmp_path / "x")])
    assert failed.exit_code == 1 and "hs.csv:42" in failed.output
    outs = []
    for name in ("a", "b"):
        res = runner.invoke(cli, ["prepare", "--input", str(src), "--out", str(tmp_path / name), "--skip-invalid",
                                  "--val-fraction", "0.25", "--seed", "3"])
        assert res.exit_code == 0, res.output
        assert "1 invalid rows skipped" in res.output
        outs.append([(tmp_path / name / f).read_text() for f in ("train.jsonl", "val.jsonl")])
    assert outs[0] == outs[1]
    train = [json.loads(line) for line in outs[0][0].splitlines()]
    val = [json.loads(line) for line in outs[0][1].splitlines()]
    assert (len(train), len(val)) == (30, 10)
    assert {c["mask"] for c in train + val} == {"User"} and all(c["system"] for c in train)


def test_split_keeps_threads_of_one_prompt_together():
    from steer_train.data import Conversation
    from steerlm.template import Turn

    convs = [Conversation(f"{q}-{k}", (Turn(f"q{q}", f"a{k}", ""),)) for q in range(20) for k in range(3)]
    train, val = split(convs, 0.3, seed=0)
    assert not {c.turns[0].question for c in train} & {c.turns[0].question for c in val}
    assert len(val) == 18


def _convs(prompts: int, answers: int):
    from steer_train.data import Conversation
    from steerlm.template import Turn

    return [Conversation(f"{q}-{k}", (Turn(f"q{q}", f"a{k}", ""),)) for q in range(prompts) for k in range(answers)]


def test_a_requested_split_keeps_at_least_one_validation_prompt():
    """30 prompts x 5% rounds to 1.5 -> 2, 8 prompts x 5% to 0: the small set still gets one."""
    train, val = split(_convs(8, 1), 0.05, seed=0)
    assert (len(train), len(val)) == (7, 1)
    assert split(_convs(1, 3), 0.05, seed=0) == (_convs(1, 3), [])  # one prompt: nothing left to train on
    assert split(_convs(8, 1), 0.0, seed=0)[1] == []  # no split asked for, none made


def test_prepare_warns_when_the_validation_share_is_far_from_the_request(tmp_path):
    """240 HelpSteer rows with 20 answers to each of 12 prompts: 5% asks for 0.6 prompts, one prompt is 8.3%."""
    rows = [[f"q{i // 20}", f"a{i}", 3, 3, 3, 3, i % 5] for i in range(240)]
    src = write_csv(tmp_path / "hs.csv", rows)
    res = CliRunner().invoke(cli, ["prepare", "--input", str(src), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "warning: validation holds 20 of 240 conversations (8.3%), not the 5.0% asked for" in res.output
    even = CliRunner().invoke(cli, ["prepare", "--input", str(src), "--out", str(tmp_path / "p"), "--val-fraction", "0.25"])
    assert even.exit_code == 0 and "warning" not in even.output
