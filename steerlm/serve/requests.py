"""Turn one SteerLM request into what the generator needs, as the preprocessing model does it.

Every problem is a `RequestError` naming the field and what it allows, so one bad request fails alone and
before it reaches the engine. The result travels to the generator as one signed JSON document
(`PreparedRequest.to_wire`/`from_wire`): the generator runs only what preprocessing built, so a client that
calls the generator directly cannot skip validation or smuggle control tokens in as ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from steerlm.sampling import SamplingParams
from steerlm.schema import SchemaError
from steerlm.serve.textstream import answer_stop_strings
from steerlm.spec import load_spec
from steerlm.tokenize import encode_segments, load_tokenizer

# Default byte limit of each text input (configurable per server: --max-input-bytes).
DEFAULT_MAX_INPUT_BYTES = 256 * 1024
KEY_FILE = ".steerlm-key"
# Text inputs besides text_input and the boolean flags of the ensemble (tensorrtllm_backend names where it has them).
TEXT_INPUTS = ("attributes", "system", "history")
FLAG_INPUTS = ("stream", "exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens")
# Optional sampling inputs of the ensemble (upstream tensorrtllm_backend names) and the defaults they take.
SAMPLING_TYPES: dict[str, type] = {
    "temperature": float, "top_k": int, "top_p": float, "seed": int, "min_tokens": int, "repetition_penalty": float,
    "presence_penalty": float, "frequency_penalty": float,
}


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
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields beyond the ones above
    stream: bool = False
    exclude_input_in_output: bool = True  # False: the whole/first text_output starts with the prompt
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, end_id=self.end_id, stop_words=self.stop_words,
                              bad_words=self.bad_words, **self.sampling)

    def to_wire(self, key: bytes) -> tuple[bytes, bytes]:
        """(document, signature) for the generator."""
        # A shallow dict: the fields are JSON values already, and dataclasses.asdict's deep copy was most of
        # the cost of signing (0.17 ms of 0.2 ms per request).
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        doc = json.dumps(fields, separators=(",", ":")).encode("utf-8")
        return doc, hmac.new(key, doc, hashlib.sha256).hexdigest().encode("ascii")

    @classmethod
    def from_wire(cls, doc: bytes, signature: bytes, key: bytes) -> "PreparedRequest":
        expected = hmac.new(key, doc, hashlib.sha256).hexdigest().encode("ascii")
        if not hmac.compare_digest(expected, bytes(signature)):
            raise RequestError("this model takes requests from the steerlm ensemble only; send yours to `steerlm`")
        return cls(**json.loads(doc))


def load_key(repo_dir: str | os.PathLike, create: bool = False) -> bytes:
    """The secret shared by preprocessing and the generator (a file in the rendered repository, never served)."""
    path = Path(repo_dir) / KEY_FILE
    if create:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode("ascii")


def decode_text(name: str, value: Any, limit: int) -> str:
    """A text input as str, refused (naming the input) when it is not text, is larger than `limit` bytes or
    is not UTF-8. The size is checked before anything else reads the value."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    if not isinstance(value, (bytes, bytearray)):
        raise RequestError(f"{name} must be text (UTF-8 string), got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(f"{name} is {len(value)} bytes; this server takes at most {limit} bytes per text input")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{name} is not valid UTF-8 (byte {exc.start}: {exc.reason}; "
                           "lone surrogates are not text either)") from None


def _check_unicode(name: str, text: str | None) -> None:
    """Callers that hand str (not bytes) in, such as the HTTP API, can carry a lone UTF-16 surrogate, which no
    tokenizer takes: refuse it naming the input, as `decode_text` does for bytes."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"{name} is not valid text: a lone UTF-16 surrogate at character {exc.start}") from None


def _number(name: str, value: Any, kind: type) -> Any:
    """A scalar input as int or float (ranges, and NaN/inf, are `SamplingParams.problem`'s to refuse)."""
    if isinstance(value, np.generic):
        value = value.item()
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {value!r}")
    return float(value)


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
        sampling: Mapping[str, Any] | None = None,
        beam_width: int | None = None,
        num_return_sequences: int | None = None,
        **flags: bool,
    ) -> PreparedRequest:
        """Validate and render one request. `sampling` holds the optional SAMPLING_TYPES inputs given;
        `flags`: stream, exclude_input_in_output, return_num_input_tokens, return_num_output_tokens."""
        if not isinstance(question, str) or not question.strip():
            raise RequestError("text_input must be a non-empty question")
        for name, texts in (("text_input", [question]), ("system", [system]), ("attributes", [attributes]),
                            ("history", [history]), ("stop_words", stop_words), ("bad_words", bad_words)):
            for text in texts:
                _check_unicode(name, text)
        if isinstance(max_tokens, np.generic):
            max_tokens = max_tokens.item()
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        for name, value in (("beam_width", beam_width), ("num_return_sequences", num_return_sequences)):
            if value is not None and _number(name, value, int) != 1:
                raise RequestError(f"{name}: only 1 is supported (one greedy or sampled answer), got {value}")
        unknown = set(flags) - {"stream", "exclude_input_in_output", "return_num_input_tokens",
                                "return_num_output_tokens"}
        if unknown:
            raise TypeError(f"unknown flags: {sorted(unknown)}")
        sampling = {k: _number(k, v, SAMPLING_TYPES[k]) for k, v in (sampling or {}).items() if v is not None}
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
        vocab = self.tok.get_vocab_size()
        for name, value in (("end_id", end_id), ("pad_id", pad_id)):
            if value is not None and not 0 <= int(value) < vocab:
                raise RequestError(f"{name} must be a token id in 0..{vocab - 1}, got {value}")
        prepared = PreparedRequest(
            input_ids=ids,
            prompt=prompt,
            max_tokens=max_tokens,
            end_id=self.end_id if end_id is None else int(end_id),
            pad_id=self.pad_id if pad_id is None else int(pad_id),
            stop_words=self._words(stop_words, extra=self.model_stop_ids),
            bad_words=self._words(bad_words),
            stop_strings=self.model_stop_strings + [w for w in stop_words if w],
            sampling=sampling,
            **{k: bool(v) for k, v in flags.items() if v is not None},
        )
        problem = prepared.params().problem()
        if problem:
            raise RequestError(problem)
        return prepared

    def from_inputs(self, inputs: Mapping[str, np.ndarray], limit: int) -> PreparedRequest:
        """`build` from the `steerlm` model's input tensors by name (each [1, 1], or [1, n] for stop/bad words),
        as both the `preprocessing` model and the `steerlm` relay receive them. Every text input is refused
        by name when it is over `limit` bytes, before it is decoded or tokenized."""

        def values(name: str) -> list:
            tensor = inputs.get(name)
            return [] if tensor is None else np.asarray(tensor).reshape(-1).tolist()

        def scalar(name: str):
            got = values(name)
            if len(got) > 1:
                raise RequestError(f"{name} must hold exactly one value (one conversation per request), "
                                   f"got {len(got)}")
            return got[0] if got else None

        def text(name: str) -> str | None:
            value = scalar(name)
            return None if value is None else decode_text(name, value, limit)

        words = {name: [decode_text(f"{name}[{i}]", v, limit) for i, v in enumerate(values(name))]
                 for name in ("stop_words", "bad_words")}
        sampling = {name: scalar(name) for name in SAMPLING_TYPES}
        min_length = scalar("min_length")
        if min_length is not None:
            if sampling["min_tokens"] not in (None, min_length):
                raise RequestError(f"min_length is another name for min_tokens; got both, and they differ "
                                   f"({min_length} and {sampling['min_tokens']})")
            sampling["min_tokens"] = min_length
        return self.build(
            text("text_input"), scalar("max_tokens"),
            **{name: text(name) for name in TEXT_INPUTS}, **words,
            end_id=scalar("end_id"), pad_id=scalar("pad_id"), sampling=sampling,
            beam_width=scalar("beam_width"), num_return_sequences=scalar("num_return_sequences"),
            **{name: scalar(name) for name in FLAG_INPUTS},
        )

    @staticmethod
    def _history(history: str | None) -> list:
        if history is None or not history.strip():
            return []
        shape = ('a JSON list of {"question": str, "answer": str, "attributes": "name:value,..." or '
                 '{"name": value} (optional), "labels": "name:value,..." (optional)} objects')
        try:
            turns = json.loads(history)
        except json.JSONDecodeError as exc:
            raise RequestError(f"history is not valid JSON ({exc.msg} at position {exc.pos}); expected {shape}") \
                from None
        except RecursionError:
            raise RequestError(f"history is nested too deeply; expected {shape}") from None
        if not isinstance(turns, list):
            raise RequestError(f"history must be {shape}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RequestError(f"history[{i}] must be an object; history is {shape}")
            for key in ("question", "answer"):
                if not isinstance(turn.get(key), str):
                    raise RequestError(f"history[{i}].{key} must be a string")
            labels, attrs = turn.get("labels"), turn.get("attributes")
            if labels is not None and not isinstance(labels, str):
                raise RequestError(f'history[{i}].labels must be a label string "name:value,...", '
                                   f"got {type(labels).__name__}")
            if attrs is not None and not (isinstance(attrs, str) or (
                    isinstance(attrs, dict) and all(isinstance(v, int) and not isinstance(v, bool)
                                                    for v in attrs.values()))):
                raise RequestError(f'history[{i}].attributes must be "name:value,..." or an object of integers')
        return turns
