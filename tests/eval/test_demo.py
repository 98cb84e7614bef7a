"""The demo's data set and its stage runner (the full demo runs as `make demo`, not in the test suite)."""

from __future__ import annotations

import json
import random

import pytest

from steer_eval.demo import Pipeline, Stage
from steer_eval.demo_data import DEMO_SCHEMA, build_demo_data, openings


def test_openings_prefer_sentence_and_clause_ends_and_fill_other_levels_with_word_cuts():
    answer = "Sure, here it is. Then a longer sentence follows here with ten more words. " + "Word " * 40 + "end."
    # Breaks give prefixes of 1 (a clause), 4 and 14 words and the whole answer (55 words); none has 17-32 words.
    cut = dict(openings(answer, random.Random(0), per_level=1))
    assert {level: cut[level] for level in (0, 1, 2, 4)} == {
        0: "Sure,",
        1: "Sure, here it is.",
        2: "Sure, here it is. Then a longer sentence follows here with ten more words.",
        4: answer,
    }
    assert answer.startswith(cut[3]) and cut[3].endswith("Word") and 17 <= len(cut[3].split()) <= 32
    capped = openings(answer, random.Random(0), max_words=20, per_level=1)
    assert [level for level, _ in capped] == [0, 1, 2, 3]  # nothing over the cap


def test_an_answer_has_openings_only_at_the_levels_its_length_reaches():
    answer = "one two three four five six seven eight nine ten"
    cut = openings(answer, random.Random(0), per_level=1)
    assert [level for level, _ in cut] == [0, 1, 2]
    (_, v0), (_, v1), (_, v2) = cut
    assert 1 <= len(v0.split()) <= 3 and 4 <= len(v1.split()) <= 8 and v2 == answer
    assert all(answer.startswith(text) for _, text in cut)


def test_each_level_gets_up_to_per_level_distinct_openings():
    answer = " ".join(f"w{i}" for i in range(80))  # no break within 60 words: every cut is a word cut
    cut = openings(answer, random.Random(0), per_level=3)
    assert len(cut) == len(set(cut))
    for level, (low, high) in enumerate([(1, 3), (4, 8), (9, 16), (17, 32), (33, 60)]):
        lengths = [len(text.split()) for lv, text in cut if lv == level]
        assert 1 <= len(lengths) <= 3 and all(low <= n <= high for n in lengths)
    assert sum(lv == 4 for lv, _ in cut) >= 2  # 28 lengths to choose from


def test_demo_data_is_weakly_labelled_and_never_trains_on_the_eval_prompts(tmp_path):
    paths = build_demo_data(tmp_path)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    val = [json.loads(line) for line in paths["val"].read_text().splitlines()]
    prompts = [json.loads(line)["question"] for line in paths["eval_prompts"].read_text().splitlines()]
    assert len(prompts) == 50
    seen = {m["value"] for c in train + val for m in c["conversations"] if m["from"] == "User"}
    assert not seen & set(prompts)
    labels = [m["label"] for c in train for m in c["conversations"] if m["from"] == "Assistant"]
    parsed = [DEMO_SCHEMA.parse(lab) for lab in labels]
    assert all(set(values) <= {"complexity", "verbosity"} for values in parsed)
    assert {values["verbosity"] for values in parsed} == {0, 1, 2, 3, 4}


def test_each_reference_answer_is_trained_at_several_lengths_that_only_the_label_tells_apart(tmp_path):
    train = [json.loads(line) for line in build_demo_data(tmp_path)["train"].read_text().splitlines()]
    by_answer: dict[str, list[tuple[str, str]]] = {}
    for c in train:
        if c["id"].startswith("mtbench-ref-"):
            user, assistant = c["conversations"]
            by_answer.setdefault(c["id"].rsplit("-v", 1)[0], []).append((user["value"], assistant["value"]))
    assert by_answer and all(len({q for q, _ in copies}) == 1 for copies in by_answer.values())
    assert sum(len(copies) >= 2 for copies in by_answer.values()) > len(by_answer) // 2
    for copies in by_answer.values():
        longest = max((a for _, a in copies), key=len)
        assert all(longest.startswith(a) for _, a in copies)


def _stage(tmp_path, calls, settings):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"

    def run():
        calls.append(1)
        out.write_text(src.read_text().upper())

    return Stage("upper", "copy in upper case", [src], [out], run, settings)


def test_a_stage_runs_again_only_when_its_inputs_or_settings_change(tmp_path):
    (tmp_path / "in.txt").write_text("a")
    calls, log = [], []
    pipe = Pipeline(tmp_path, echo=log.append)
    pipe.run([_stage(tmp_path, calls, {"n": 1})])
    pipe.run([_stage(tmp_path, calls, {"n": 1})])
    assert len(calls) == 1 and any("up to date" in line for line in log)
    (tmp_path / "in.txt").write_text("b")
    pipe.run([_stage(tmp_path, calls, {"n": 1})])
    assert len(calls) == 2 and (tmp_path / "out.txt").read_text() == "B"
    pipe.run([_stage(tmp_path, calls, {"n": 2})])
    assert len(calls) == 3
    (tmp_path / "out.txt").unlink()
    pipe.run([_stage(tmp_path, calls, {"n": 2})])
    assert len(calls) == 4


def test_a_failed_stage_leaves_no_stamp_so_the_next_run_retries_it(tmp_path):
    (tmp_path / "in.txt").write_text("a")

    def boom():
        raise RuntimeError("crash")

    stage = Stage("upper", "fails", [tmp_path / "in.txt"], [tmp_path / "in.txt"], boom)
    with pytest.raises(RuntimeError, match="crash"):
        Pipeline(tmp_path, echo=lambda _: None).run([stage])
    assert not (tmp_path / "stamps" / "upper.json").exists()
