"""Checkpoints the tests build from the shared tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def random_reward_model(base: Path, out: Path, extra: dict) -> Path:
    """A reward checkpoint in the contract format at `out`: `base`'s backbone and a random linear head whose
    scores spread over the schema's range; `extra` is the spec's reward_model settings (pooling, weights...)."""
    from safetensors.numpy import save_file

    from steerlm.spec import SteerSpec, load_spec, save_spec

    shutil.copytree(base, out)
    spec = load_spec(base)
    rng = np.random.default_rng(0)
    hidden = 64  # the tiny model's hidden size
    save_file({"weight": rng.normal(0, 2, (len(spec.schema), hidden)).astype(np.float32),
               "bias": rng.normal(2, 1, len(spec.schema)).astype(np.float32)}, str(out / "reward_head.safetensors"))
    save_spec(out, SteerSpec(spec.schema, spec.template, "reward_model", extra))
    return out
