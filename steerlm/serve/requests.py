"""Turn one SteerLM request into what the generator needs, as the preprocessing model does it.

Every problem is a `RequestError` naming the field and what it allows, so one bad request fails alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from steerlm.schema import SchemaError
from steerlm.serve.textstream import answer_stop_strings
from steerlm.spec import load_spec
from steerlm.tokenize import encode_segments, load_tokenizer


class RequestError(ValueError):
    """A request field is missing, malformed or out of range."""


@dataclass
class PreparedRequest:
    input_ids: list[int]
    prompt: str
    max_tokens: int
    end_id: int
    pad_id: int
    stop_words: list[list[int]]
    bad_words: list[list[int]]
    # Text that ends the answer and is never shown (see `steerlm.serve.textstream.TextStream`).
    stop_strings: list[str] = field(default_factory=list)


def word_list(words: Sequence[Sequence[int]]) -> np.ndarray:
    """TensorRT-LLM word list, INT32 [2, n]: row 0 the ids of all words concatenated, row 1 each word's
    cumulative end offset; row 0 is padded with 0 and row 1 with -1 (an empty list is [[0], [-1]])."""
    ids = [int(t) for w in words for t in w]
    offsets = list(np.cumsum([len(w) for w in words]).tolist()) if words else []
    width = max(1, len(ids))
    out = np.zeros((2, width), dtype=np.int32)
    out[0, : len(ids)] = ids
    out[1, :] = -1
    out[1, : len(offsets)] = offsets
    return out


def parse_word_list(arr: np.ndarray) -> list[list[int]]:
    """Inverse of `word_list`."""
    arr = np.asarray(arr).reshape(2, -1)
    words, start = [], 0
    for end in arr[1]:
        if end < 0:
            break
        words.append([int(t) for t in arr[0, start:end]])
        start = int(end)
    return words


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _first(value):
    return value[0] if isinstance(value, list) and value else value


class RequestBuilder:
    """Validates requests for one checkpoint and renders/tokenizes them with the checkpoint's template."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        model_dir = Path(model_dir)
        self.spec = load_spec(model_dir)
        self.tok = load_tokenizer(model_dir)
        config = _read_json(model_dir / "config.json")
        gen = _read_json(model_dir / "generation_config.json")
        self.max_positions = int(config.get("max_position_embeddings") or 0) or None
        eos = gen.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        template = self.spec.template
        if not eos_ids:
            eos_ids = [t for t in (self.tok.token_to_id(s) for s in template.stop_strings) if t is not None][:1]
        if not eos_ids:
            raise ValueError(f"{model_dir}: no eos_token_id in generation_config.json/config.json")
        self.end_id = eos_ids[0]
        pad = _first(gen.get("pad_token_id", config.get("pad_token_id")))
        self.pad_id = int(pad) if pad is not None else self.end_id
        # Extra end ids (a list eos_token_id) become stop words; the C++ backend takes a single end_id.
        self.model_stop_words = list(template.stop_strings) + [self.tok.id_to_token(e) for e in eos_ids[1:]]
        self.model_stop_ids = [self._encode_word(w) for w in self.model_stop_words]
        # In text, the template's separator before a stop string belongs to no answer.
        self.model_stop_strings = answer_stop_strings(self.model_stop_words, template.answer_end)

    def _encode_word(self, word: str) -> list[int]:
        # Stop/bad words are not prompt content, so a control string given here means the control token.
        return self.tok.encode(word, add_special_tokens=False).ids

    def _words(self, words: Sequence[str], extra: Sequence[list[int]] = ()) -> list[list[int]]:
        out: list[list[int]] = [list(w) for w in extra]
        for w in words:
            if not w:
                continue  # stock tensorrtllm_backend clients send "" for "no words"
            seqs = [self._encode_word(w)]
            # In running text a word usually follows a space, which byte-level BPEs merge into its tokens.
            if not w[0].isspace():
                spaced = self._encode_word(" " + w)
                if spaced[-len(seqs[0]) :] != seqs[0]:  # generation matches words as token suffixes
                    seqs.append(spaced)
            out += [s for s in seqs if s and s not in out]
        return out

    def build(
        self,
        question: str,
        max_tokens: int,
        *,
        attributes: str | None = None,
        system: str | None = None,
        history: str | None = None,
        stop_words: Sequence[str] = (),
        bad_words: Sequence[str] = (),
        end_id: int | None = None,
        pad_id: int | None = None,
    ) -> PreparedRequest:
        if not isinstance(question, str) or not question.strip():
            raise RequestError("text_input must be a non-empty question")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        schema = self.spec.schema
        try:
            values = schema.parse(attributes or "")
        except SchemaError as exc:
            allowed = ", ".join(f"{a.name} ({a.min}..{a.max})" for a in schema.attributes)
            raise RequestError(f"attributes: {exc}. Format: name:value,... with names and ranges: {allowed}") from None
        turns_history = self._history(history)
        try:
            turns = self.spec.prompt_turns(question, values, turns_history)
        except SchemaError as exc:
            raise RequestError(f"history: {exc}") from None
        segments = self.spec.template.segments(turns, system)
        ids, _ = encode_segments(self.tok, segments)
        prompt = "".join(s.text for s in segments)
        max_tokens = int(max_tokens)
        if self.max_positions and len(ids) + max_tokens > self.max_positions:
            raise RequestError(
                f"max_tokens: the prompt is {len(ids)} tokens and the model's context is {self.max_positions}, "
                f"so max_tokens must be <= {max(self.max_positions - len(ids), 0)} (got {max_tokens})"
            )
        end_id = self.end_id if end_id is None else int(end_id)
        return PreparedRequest(
            input_ids=ids,
            prompt=prompt,
            max_tokens=max_tokens,
            end_id=end_id,
            pad_id=self.pad_id if pad_id is None else int(pad_id),
            stop_words=self._words(stop_words, extra=self.model_stop_ids),
            bad_words=self._words(bad_words),
            stop_strings=self.model_stop_strings + [w for w in stop_words if w],
        )

    @staticmethod
    def _history(history: str | None) -> list:
        if history is None or not history.strip():
            return []
        try:
            turns = json.loads(history)
        except json.JSONDecodeError as exc:
            raise RequestError(
                f"history is not valid JSON ({exc.msg} at position {exc.pos}); expected a list of "
                '{"question": ..., "answer": ..., "attributes": "name:value,..." (optional)} objects'
            ) from None
        if not isinstance(turns, list):
            raise RequestError('history must be a JSON list of {"question": ..., "answer": ...} objects')
        return turns
