"""Prompt tokenization shared by training, the reward model and serving (one code path, no torch).

Template text is encoded with control tokens recognised; user text is encoded with them disabled,
so a user who types `<extra_id_1>` gets ordinary text tokens, never a turn boundary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from steerlm.template import PromptTemplate, Segment, Turn


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: SteerLM checkpoints need a fast-tokenizer tokenizer.json")
    return Tokenizer.from_file(str(path))


def encode_segments(tok: Tokenizer, segments: Sequence[Segment]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids plus, per segment, its [start, end) token span."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for seg in segments:
        tok.encode_special_tokens = seg.user
        try:
            piece = tok.encode(seg.text, add_special_tokens=False).ids
        finally:
            tok.encode_special_tokens = False
        spans.append((len(ids), len(ids) + len(piece)))
        ids.extend(piece)
    return ids, spans


def encode_prompt(tok: Tokenizer, template: PromptTemplate, turns: Sequence[Turn], system: str | None = None) -> list[int]:
    return encode_segments(tok, template.segments(turns, system))[0]


def control_ids(tok: Tokenizer, template: PromptTemplate) -> dict[str, int]:
    """Token id of each control token; a checkpoint without them cannot follow the template."""
    out = {}
    for t in template.control_tokens:
        tid = tok.token_to_id(t)
        if tid is None:
            raise ValueError(f"tokenizer has no token for control string {t!r}; add it as a special token")
        out[t] = tid
    return out
