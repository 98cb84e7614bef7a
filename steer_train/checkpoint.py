"""Resumable training state under OUT/checkpoints/step-NNNNNNN: written whole or not at all, and without pickle.

Tensors (weights, optimizer moments, torch RNG states) go to `state.safetensors`; everything else (step,
optimizer hyper-parameters, scheduler, Python and NumPy RNG states) to `state.json`, where a tensor appears as
a reference to its safetensors key. Loading runs no code from the run directory, unlike `torch.load` of a
pickle, so a checkpoint from someone else is as safe to resume from as a weights file.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from steer_train.loop import Dist, all_sum
from steerlm.files import staged_dir

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
FORMAT = "steerlm-train-state-1"
# JSON has no tuples, non-string keys or arrays; these tags bring them back exactly.
_TENSOR, _TUPLE, _ITEMS, _ARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


def checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE_JSON).is_file())


def _to_json(obj: Any, key: str, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory (tied embeddings); such a tensor is stored as a copy.
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return {_ARRAY: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {_TUPLE: [_to_json(v, f"{key}.{i}", tensors, storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, f"{key}.{i}", tensors, storages) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _to_json(v, f"{key}.{k}", tensors, storages) for k, v in obj.items()}
        return {_ITEMS: [[k, _to_json(v, f"{key}.{k}", tensors, storages)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state at {key!r}: cannot store a {type(obj).__name__} without pickle")


def _from_json(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _ARRAY in obj:
        return np.array(obj[_ARRAY], dtype=obj["dtype"])
    if _TUPLE in obj:
        return tuple(_from_json(v, tensors) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_hashable(k): _from_json(v, tensors) for k, v in obj[_ITEMS]}
    return {k: _from_json(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_checkpoint(out: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` (nested dicts, lists, tuples, tensors, NumPy arrays, plain values) as one checkpoint
    directory, staged and renamed into place, then drop all but the newest `keep` (0: keep all)."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tensors: dict[str, torch.Tensor] = {}
    tree = _to_json(state, "state", tensors, set())
    with staged_dir(final) as tmp:
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": FORMAT})
        (tmp / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": tree}))
    for old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> dict:
    """The state saved in one checkpoint directory (tensors on CPU)."""
    meta = json.loads((path / STATE_JSON).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / STATE_JSON}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return _from_json(meta["state"], load_file(str(path / STATE_TENSORS), device="cpu"))


def load_latest(out: Path) -> dict | None:
    """The newest checkpoint's state, or None. A checkpoint directory of an older release (a pickled
    `state.pt`) is refused rather than unpickled."""
    root = out / "checkpoints"
    legacy = sorted(root.glob("step-*/state.pt")) if root.is_dir() else []
    if legacy and not checkpoints(out):
        raise ValueError(f"{legacy[-1]} is a pickled checkpoint of an older release, which is not loaded (it could "
                         f"run code); remove {root} to start over")
    found = checkpoints(out)
    return load_state(found[-1]) if found else None


def _now() -> float:
    return time.monotonic()


class SaveSchedule:
    """When a loop writes a checkpoint: every `every` optimizer steps (and at the last), and whenever `minutes`
    have passed since the last one, so a run killed after an hour loses minutes, not the hour. All processes
    follow the main process's clock, so they save at the same step."""

    def __init__(self, every: int, minutes: float, d: Dist):
        self.every, self.seconds, self.d = every, minutes * 60, d
        self.last = _now()

    def due(self, done: int, total: int) -> bool:
        by_steps = bool(self.every) and (done % self.every == 0 or done == total)
        by_time = False
        if self.seconds > 0:
            late = self.d.main and _now() - self.last >= self.seconds
            by_time = all_sum(float(late), self.d) > 0
        if by_steps or by_time:
            self.last = _now()
            return True
        return False


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
