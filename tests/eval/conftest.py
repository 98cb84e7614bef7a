"""Fixtures of the evaluation tests: a tiny reward model made from the shared tiny checkpoint."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def tiny_rm(tiny_model, tmp_path_factory) -> pathlib.Path:
    """A random tiny reward model (HelpSteer schema, last-token pooling) in the contract's checkpoint layout."""
    import torch
    from transformers import AutoModel, PreTrainedTokenizerFast

    from steerlm.reward import RewardModel, save_reward_model
    from steerlm.spec import load_spec

    torch.manual_seed(0)
    spec = load_spec(tiny_model)
    model = RewardModel(AutoModel.from_pretrained(tiny_model), len(spec.schema), "last")
    out = tmp_path_factory.mktemp("rm") / "rm"
    return save_reward_model(out, model, PreTrainedTokenizerFast.from_pretrained(tiny_model), spec, max_length=512)
