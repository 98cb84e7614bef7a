"""Conversation data: readers for the public SteerLM data sets and the NeMo-Aligner conversation JSONL.

Every reader yields `Conversation`s; `write_jsonl` writes them in the NeMo-Aligner schema (docs/user-guide/steerlm.rst)
plus an `id` field that annotation uses to resume. Label strings are validated against the schema and kept
partial: only the attributes a source actually rated are written ("keep only present attributes").
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from steerlm.files import write_atomic
from steerlm.schema import AttributeSchema, SchemaError
from steerlm.template import DEFAULT_SYSTEM, Turn

FORMATS = ("auto", "helpsteer", "oasst", "nemo")
HELPSTEER_ATTRS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
# HelpSteer2 carries earlier turns inside `prompt`: "q1\n<extra_id_1>Assistant\na1\n<extra_id_1>User\nq2".
_H2_ASSISTANT, _H2_USER = "<extra_id_1>Assistant\n", "<extra_id_1>User\n"


class DataError(ValueError):
    """A row that does not fit its format; the message names the file and line."""


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]
    system: str | None = None

    def to_json(self) -> dict:
        conv = []
        for t in self.turns:
            conv.append({"from": "User", "value": t.question, "label": None})
            conv.append({"from": "Assistant", "value": t.answer, "label": t.labels or None})
        # NeMo-Aligner readers expect a system string; the template's default renders the same as None.
        system = DEFAULT_SYSTEM if self.system is None else self.system
        return {"id": self.id, "system": system, "mask": "User", "type": "VALUE_TO_TEXT", "conversations": conv}


def canonical_labels(schema: AttributeSchema, text: str | None) -> str:
    """Validate a (possibly partial) label string and write it in schema order, present attributes only."""
    return schema.encode(schema.parse(text or ""), partial=True)


def conversation_from_json(obj: object, schema: AttributeSchema, fallback_id: str) -> Conversation:
    """Parse one NeMo-Aligner conversation object; raises DataError naming the bad field."""
    if not isinstance(obj, Mapping):
        raise DataError("expected a JSON object with 'conversations'")
    msgs = obj.get("conversations")
    if not isinstance(msgs, list) or not msgs:
        raise DataError("'conversations' must be a non-empty list of {from, value, label}")
    if len(msgs) % 2:
        raise DataError(f"'conversations' has {len(msgs)} messages; expected User/Assistant pairs")
    turns = []
    for i in range(0, len(msgs), 2):
        user, bot = msgs[i], msgs[i + 1]
        for j, (m, role) in enumerate(((user, "user"), (bot, "assistant"))):
            if not isinstance(m, Mapping) or str(m.get("from", "")).lower() != role:
                raise DataError(f"conversations[{i + j}].from must be {role.capitalize()!r} (turns alternate User/Assistant)")
            if not isinstance(m.get("value"), str):
                raise DataError(f"conversations[{i + j}].value must be a string")
        try:
            labels = canonical_labels(schema, bot.get("label"))
        except SchemaError as exc:
            raise DataError(f"conversations[{i + 1}].label: {exc}") from None
        turns.append(Turn(user["value"], bot["value"], labels))
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError("'system' must be a string or null")
    cid = obj.get("id")
    return Conversation(str(cid) if cid is not None else fallback_id, tuple(turns), system)


# ---------------------------------------------------------------- readers: each yields (line number, row) or raises


def _rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, raw row) from CSV, JSON lines or (when pandas is installed) parquet."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row
    elif suffix == ".parquet":
        try:
            import pandas
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pandas and pyarrow; convert it to JSONL or CSV") from None
        for i, row in enumerate(pandas.read_parquet(path).to_dict("records"), 1):
            yield i, row
    else:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield i, DataError(f"invalid JSON: {exc}")


def _split_helpsteer2_prompt(prompt: str) -> tuple[list[tuple[str, str]], str]:
    """Earlier (question, answer) turns and the final question of a HelpSteer2 prompt."""
    history, rest = [], prompt
    while _H2_ASSISTANT in rest:
        q, _, after = rest.partition(_H2_ASSISTANT)
        if _H2_USER not in after:
            raise DataError("multi-turn prompt has an assistant turn without a following '<extra_id_1>User' turn")
        a, _, rest = after.partition(_H2_USER)
        history.append((q.strip(), a.strip()))
    return history, rest.strip() if history else rest


def helpsteer_conversation(row: object, schema: AttributeSchema, cid: str) -> Conversation:
    if not isinstance(row, Mapping):
        raise DataError("expected an object with prompt, response and the HelpSteer attributes")
    for key in ("prompt", "response"):
        if not isinstance(row.get(key), str):
            raise DataError(f"field {key!r} must be a string")
    values = {}
    for name in HELPSTEER_ATTRS:
        raw = row.get(name)
        if raw is None or raw == "":
            continue  # a missing rating stays missing
        if name not in schema.names:
            continue
        attr = schema[name]
        try:
            number = float(raw)
            if not number.is_integer():
                raise ValueError
            values[name] = attr.check(int(number))
        except (SchemaError, ValueError, TypeError):
            raise DataError(f"field {name!r}: {raw!r} is not an integer in {attr.min}..{attr.max}") from None
    history, question = _split_helpsteer2_prompt(row["prompt"])
    turns = [Turn(q, a, "") for q, a in history]
    turns.append(Turn(question, row["response"], schema.encode(values, partial=True)))
    return Conversation(cid, tuple(turns))


def _oasst_labels(schema: AttributeSchema, labels: object) -> str:
    """OpenAssistant {name: [...], value: [...]} in 0..1 -> label string, schema attributes only."""
    if not labels:
        return ""
    if not isinstance(labels, Mapping) or len(labels.get("name", [])) != len(labels.get("value", [])):
        raise DataError("labels must be {name: [...], value: [...]} of equal length")
    values = {}
    for name, value in zip(labels["name"], labels["value"]):
        if name in schema.names:
            attr = schema[name]
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise DataError(f"labels value for {name!r} must be a number in 0..1, got {value!r}")
            values[name] = attr.min + round(value * (attr.max - attr.min))
    return schema.encode(values, partial=True)


def _oasst_threads(root: Mapping, children: Callable[[Mapping], Sequence[Mapping]]) -> Iterator[list[Mapping]]:
    """Every root-to-leaf path of a message tree, cut after its last assistant message."""
    stack = [[root]]
    while stack:
        path = stack.pop()
        kids = [k for k in children(path[-1]) if not k.get("deleted")]
        if kids:
            stack.extend(path + [k] for k in reversed(kids))
            continue
        if path[-1].get("role") != "assistant":
            path = path[:-1]
        if path:
            yield path


def oasst_conversations(
    rows: Iterable[tuple[int, object]], schema: AttributeSchema, lang: str | None, on_error: Callable
) -> Iterator[Conversation]:
    """oasst1/oasst2 message trees (one tree per line) or flat messages (message_id / parent_id)."""
    flat: dict[str, Mapping] = {}
    kids: dict[str, list[Mapping]] = {}
    roots: list[tuple[int, Mapping]] = []
    for line, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, Mapping):
                raise DataError("expected a message tree or a message object")
            if "prompt" in row and isinstance(row["prompt"], Mapping):
                roots.append((line, row["prompt"]))
            elif "message_id" in row:
                flat[row["message_id"]] = row
                if row.get("parent_id"):
                    kids.setdefault(row["parent_id"], []).append(row)
                else:
                    roots.append((line, row))
            else:
                raise DataError("neither a tree (field 'prompt') nor a message (field 'message_id')")
        except DataError as exc:
            on_error(line, exc)

    def children(m: Mapping) -> Sequence[Mapping]:
        return m.get("replies") or kids.get(m.get("message_id"), [])

    for line, root in roots:
        if root.get("deleted") or (lang and root.get("lang") not in (None, lang)):
            continue
        for n, path in enumerate(_oasst_threads(root, children)):
            try:
                turns = []
                for i in range(0, len(path) - 1, 2):
                    q, a = path[i], path[i + 1]
                    if q.get("role") != "prompter" or a.get("role") != "assistant":
                        raise DataError("message roles must alternate prompter/assistant")
                    for m in (q, a):
                        if not isinstance(m.get("text"), str):
                            raise DataError(f"message {m.get('message_id')}: 'text' must be a string")
                    turns.append(Turn(q["text"], a["text"], _oasst_labels(schema, a.get("labels"))))
                if turns:
                    yield Conversation(f"{root.get('message_id', line)}-{n}", tuple(turns))
            except DataError as exc:
                on_error(line, exc)


def detect_format(row: object) -> str:
    if isinstance(row, Mapping):
        if "conversations" in row:
            return "nemo"
        if "prompt" in row and "response" in row:
            return "helpsteer"
        if "message_id" in row or isinstance(row.get("prompt"), Mapping):
            return "oasst"
    raise DataError("cannot tell the format of this row; pass --format helpsteer|oasst|nemo")


def read_conversations(
    path: str | os.PathLike,
    schema: AttributeSchema,
    fmt: str = "auto",
    *,
    skip_invalid: bool = False,
    lang: str | None = None,
) -> tuple[list[Conversation], int]:
    """All conversations of one file and the number of rows skipped (only with skip_invalid)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    skipped = 0

    def on_error(line: int, exc: Exception) -> None:
        nonlocal skipped
        if not skip_invalid:
            raise DataError(f"{path}:{line}: {exc}") from None
        skipped += 1

    rows = list(_rows(path))
    if fmt == "auto":
        first = next((r for _, r in rows if not isinstance(r, Exception)), None)
        if first is None:
            return [], skipped
        try:
            fmt = detect_format(first)
        except DataError as exc:
            raise DataError(f"{path}:{rows[0][0]}: {exc}") from None
    if fmt == "oasst":
        return list(oasst_conversations(rows, schema, lang, on_error)), skipped
    # Without an `id` field a conversation is named by its file and line, which a rerun reproduces.
    out = []
    for line, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            cid = f"{path.stem}-{line}"
            conv = helpsteer_conversation(row, schema, cid) if fmt == "helpsteer" else conversation_from_json(row, schema, cid)
            out.append(conv)
        except DataError as exc:
            on_error(line, exc)
    return out, skipped


def load_jsonl(path: str | os.PathLike, schema: AttributeSchema) -> list[Conversation]:
    """Conversation JSONL (what `prepare` writes); any bad line is an error naming file and line."""
    return read_conversations(path, schema, "nemo")[0]


def write_jsonl(path: str | os.PathLike, conversations: Iterable[Conversation]) -> int:
    """Write atomically (temp file + rename), so a crash never leaves a valid-looking partial file."""
    lines = [jsonl_line(conv) for conv in conversations]
    write_atomic(path, "".join(lines))
    return len(lines)


def jsonl_line(conv: Conversation) -> str:
    """One conversation as a line of the JSONL that `load_jsonl` reads."""
    return json.dumps(conv.to_json(), ensure_ascii=False) + "\n"


def split(conversations: Sequence[Conversation], val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded train/validation split; conversations that share a first question stay on the same side,
    so threads of one OpenAssistant tree never leak between train and validation. A split that is asked for
    gets at least one prompt on each side when there are two prompts or more."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[Conversation]] = {}
    for c in conversations:
        groups.setdefault(hashlib.sha1(c.turns[0].question.encode()).hexdigest(), []).append(c)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_val = round(len(keys) * val_fraction)
    if val_fraction > 0 and len(keys) > 1:
        n_val = min(max(n_val, 1), len(keys) - 1)
    val = [c for k in keys[:n_val] for c in groups[k]]
    train = [c for k in keys[n_val:] for c in groups[k]]
    return train, val


def split_warning(n_train: int, n_val: int, val_fraction: float) -> str | None:
    """A sentence when the validation share of conversations is far (off by half or more) from the request;
    prompts are split whole, so few prompts or many answers per prompt move the share."""
    if val_fraction <= 0:
        return None
    share = n_val / max(n_train + n_val, 1)
    if abs(share - val_fraction) < val_fraction / 2:
        return None
    return (f"validation holds {n_val} of {n_train + n_val} conversations ({share:.1%}), not the {val_fraction:.1%} "
            "asked for: the split keeps all answers to one prompt on one side, and this data has few prompts")
