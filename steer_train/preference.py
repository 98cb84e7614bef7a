"""HelpSteer2-Preference pairs and the Bradley-Terry reward-model losses of NeMo-Aligner.

The preference file (`nvidia/HelpSteer2`, data_dir `preference`) has one row per pair: `prompt` (earlier
turns inline, as in HelpSteer2), `response_1`, `response_2`, `preference_strength` (an integer -3..3;
negative: response 1 is preferred, positive: response 2, by as much as its magnitude) and `split`
(train/validation). NeMo-Aligner PR #361 (NVIDIA/NeMo-Aligner d3493c75,
nemo_aligner/models/nlp/gpt/megatron_gpt_regression_reward_model.py `bt_loss_func`) defines the losses on the
predicted reward r of each response, with chosen = response 1 if strength < 0 else response 2 (a zero
strength counts for response 2) and margin = |strength|:

    regular_bt:  -log sigmoid(r_chosen - r_rejected)
    margin_bt:   -log sigmoid(r_chosen - r_rejected - margin)
    scaled_bt:   margin * -log sigmoid(r_chosen - r_rejected)

`prepare` writes each pair as one JSONL line: {"id", "system", "chosen": conversation, "rejected":
conversation, "margin"}, the conversations in the NeMo-Aligner schema, so the chosen/rejected rule lives here only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from steer_train.data import Conversation, DataError, _rows, _split_helpsteer2_prompt, conversation_from_json
from steerlm.files import write_atomic
from steerlm.schema import AttributeSchema
from steerlm.template import Turn

BT_LOSSES = ("regular_bt", "margin_bt", "scaled_bt")
LOSSES = ("regression", *BT_LOSSES)
STRENGTHS = range(-3, 4)


@dataclass(frozen=True)
class Pair:
    id: str
    chosen: Conversation
    rejected: Conversation
    margin: float

    def to_json(self) -> dict:
        chosen, rejected = self.chosen.to_json(), self.rejected.to_json()
        return {"id": self.id, "system": chosen["system"], "chosen": chosen, "rejected": rejected, "margin": self.margin}


def is_preference_row(row: object) -> bool:
    return isinstance(row, Mapping) and {"response_1", "response_2", "preference_strength"} <= set(row)


def pair_from_helpsteer2(row: Mapping, pid: str) -> tuple[Pair, str | None]:
    """One HelpSteer2-Preference row -> (Pair, its `split` or None); DataError names the bad field."""
    for key in ("prompt", "response_1", "response_2"):
        if not isinstance(row.get(key), str):
            raise DataError(f"field {key!r} must be a string")
    raw = row.get("preference_strength")
    try:
        strength = int(raw)
        if strength != float(raw) or strength not in STRENGTHS:
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"field 'preference_strength': {raw!r} is not an integer in -3..3") from None
    history, question = _split_helpsteer2_prompt(row["prompt"])
    before = tuple(Turn(q, a, "") for q, a in history)

    def conv(answer: str, side: str) -> Conversation:
        return Conversation(f"{pid}-{side}", before + (Turn(question, answer, ""),))

    first, second = conv(row["response_1"], "1"), conv(row["response_2"], "2")
    chosen, rejected = (first, second) if strength < 0 else (second, first)
    split = row.get("split")
    return Pair(pid, chosen, rejected, float(abs(strength))), str(split) if split is not None else None


def read_helpsteer2_preference(path: str | os.PathLike, *, skip_invalid: bool = False) -> tuple[list[Pair], list[str | None], int]:
    """Pairs, the `split` of each and the number of bad rows skipped (only with skip_invalid)."""
    path = Path(path)
    pairs, splits, skipped = [], [], 0
    for line, row in _rows(path):
        try:
            if isinstance(row, Exception):
                raise row
            if not is_preference_row(row):
                raise DataError("expected HelpSteer2-Preference fields prompt, response_1, response_2, preference_strength")
            pair, split = pair_from_helpsteer2(row, f"{path.stem}-{line}")
        except DataError as exc:
            if not skip_invalid:
                raise DataError(f"{path}:{line}: {exc}") from None
            skipped += 1
            continue
        pairs.append(pair)
        splits.append(split)
    return pairs, splits, skipped


def write_pairs(path: str | os.PathLike, pairs: Sequence[Pair]) -> int:
    write_atomic(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs))
    return len(pairs)


def load_pairs(path: str | os.PathLike, schema: AttributeSchema) -> list[Pair]:
    """Pair JSONL as `prepare` writes it; any bad line is an error naming file and line."""
    path = Path(path)
    out = []
    for line, row in _rows(path):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, Mapping) or not all(isinstance(row.get(k), Mapping) for k in ("chosen", "rejected")):
                raise DataError("expected a preference pair {id, chosen, rejected, margin}; is this a conversation file?")
            margin = row.get("margin", 0.0)
            if not isinstance(margin, (int, float)) or margin < 0:
                raise DataError(f"field 'margin' must be a number >= 0, got {margin!r}")
            pid = str(row.get("id", f"{path.stem}-{line}"))
            out.append(Pair(pid, conversation_from_json(row["chosen"], schema, f"{pid}-c"),
                            conversation_from_json(row["rejected"], schema, f"{pid}-r"), float(margin)))
        except DataError as exc:
            raise DataError(f"{path}:{line}: {exc}") from None
    return out


def bt_loss(kind: str, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry loss [n] of rewards `chosen`, `rejected` [n] and margins [n] (module doc)."""
    if kind == "regular_bt":
        return -F.logsigmoid(chosen - rejected)
    if kind == "margin_bt":
        return -F.logsigmoid(chosen - rejected - margin)
    if kind == "scaled_bt":
        return margin * -F.logsigmoid(chosen - rejected)
    raise ValueError(f"loss {kind!r} must be one of {', '.join(BT_LOSSES)}")


def first_row_is_preference(path: str | os.PathLike) -> bool:
    for _, row in _rows(Path(path)):
        return is_preference_row(row)
    return False


def split_pairs(pairs: Sequence[Pair], splits: Sequence[str | None], val_fraction: float, seed: int) -> tuple[list, list]:
    """HelpSteer2's own `split` when every row has one (train vs the rest), else the seeded split of `prepare`
    by first question, so pairs on one prompt stay on the same side."""
    from steer_train.data import split

    if splits and all(s is not None for s in splits):
        return [p for p, s in zip(pairs, splits) if s == "train"], [p for p, s in zip(pairs, splits) if s != "train"]
    by_id = {p.chosen.id: p for p in pairs}
    train, val = split([p.chosen for p in pairs], val_fraction, seed)
    return [by_id[c.id] for c in train], [by_id[c.id] for c in val]
