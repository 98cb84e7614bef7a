"""Token ids of sample prompts, rendered in the checkpoint's own SteerLM template.

FP8 calibration and verification see the model the way serving will: system header, user turn and the
attribute label string. Calibration and verification use different questions so that the verifier
does not grade FP8 scales on the very prompts they were fitted to. Checkpoints without steerlm.json or
tokenizer.json (any other Llama) get seeded random token ids instead.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from steerlm.spec import SPEC_FILE, load_spec
from steerlm.template import Turn
from steerlm.tokenize import encode_prompt, load_tokenizer

CALIBRATION_QUESTIONS = [
    "Explain how a neural network learns from data, step by step.",
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it historically important?",
    "Summarise the plot of a detective story in three sentences.",
    "Give me a recipe for a quick vegetarian dinner.",
    "How do vaccines train the immune system?",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "List five tips for writing clean Python code.",
]
VERIFY_QUESTIONS = [
    "Where and when did techno music originate?",
    "Why is the sky blue during the day and red at sunset?",
    "Describe the water cycle for a ten-year-old.",
    "What are the pros and cons of remote work?",
]


def sample_token_ids(model_dir: str | os.PathLike, purpose: str = "verify", max_len: int = 256) -> list[list[int]]:
    """Prompts for `purpose` ("calibration" or "verify"), each truncated to `max_len` tokens."""
    questions = CALIBRATION_QUESTIONS if purpose == "calibration" else VERIFY_QUESTIONS
    model_dir = Path(model_dir)
    if (model_dir / SPEC_FILE).is_file() and (model_dir / "tokenizer.json").is_file():
        spec = load_spec(model_dir)
        tok = load_tokenizer(model_dir)
        out = []
        for i, question in enumerate(questions):
            # Vary the attributes so label tokens of every value pass through the model.
            values = {a.name: a.min + (i + j) % (a.max - a.min + 1) for j, a in enumerate(spec.schema.attributes)}
            history = []
            if i % 2:
                history = [Turn("Hello!", "Hello, how can I help you today?", spec.schema.encode(values))]
            turns = history + spec.prompt_turns(question, values)
            out.append(encode_prompt(tok, spec.template, turns)[:max_len])
        return out
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    rng = random.Random(0 if purpose == "calibration" else 1)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(16, 64))] for _ in questions]
