"""Resumable training state: no pickle on disk, loaded without running code, written by time by default."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import steer_train.checkpoint as checkpoint
import steer_train.rm as rm
from steer_train.checkpoint import load_latest, load_state, rng_state, save_checkpoint
from tests.train.runs import losses, train_until_crash


def sample_state() -> dict:
    net = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    net[1].weight = net[0].weight  # tied, as in models sharing input and output embeddings
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.tensor([1, 2])).sum().backward()
    opt.step()
    return {"step": 3, "model": net.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state()}


def test_state_round_trips_through_safetensors_and_json_only(tmp_path):
    state = sample_state()
    path = save_checkpoint(tmp_path, 3, state, keep=2)
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "state.safetensors"]
    json.loads((path / "state.json").read_text())  # plain JSON
    back = load_state(path)
    assert back["step"] == 3
    assert all(torch.equal(state["model"][k], back["model"][k]) for k in state["model"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert set(back["optimizer"]["state"]) == set(state["optimizer"]["state"])  # int keys stay ints
    assert back["rng"]["python"] == state["rng"]["python"]
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    torch.set_rng_state(back["rng"]["torch"])
    fresh = torch.optim.AdamW(torch.nn.Sequential(torch.nn.Embedding(5, 3)).parameters())
    fresh.load_state_dict({"state": {0: back["optimizer"]["state"][0]}, "param_groups": back["optimizer"]["param_groups"]})


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    assert load_latest(tmp_path) == {"step": 3}


def test_a_pickled_checkpoint_is_refused_not_unpickled(tmp_path):
    old = tmp_path / "checkpoints" / "step-0000005"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(ValueError, match="pickled checkpoint of an older release"):
        load_latest(tmp_path)


def test_an_object_json_cannot_hold_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="'state.when'"):
        save_checkpoint(tmp_path, 1, {"when": object()}, keep=1)
    assert checkpoint.checkpoints(tmp_path) == []


def test_rm_with_default_settings_checkpoints_by_time_and_resumes_exactly(tiny_model, rm_data, tmp_path, monkeypatch):
    """Every call of the clock is 31 minutes later, so the default --save-minutes (30) saves after every step;
    a run killed right after the step-2 checkpoint, rerun, ends where an uninterrupted one does."""
    def config(name):
        return rm.RMConfig(model=str(tiny_model), data=str(rm_data[0]), out=str(tmp_path / name), batch_size=8,
                           lr=5e-3, max_steps=4, warmup=1, max_length=128, progress=False)

    clock = itertools.count(0, 31 * 60)
    monkeypatch.setattr(checkpoint, "_now", lambda: next(clock))
    straight = rm.train(config("straight"))
    assert [p.name for p in checkpoint.checkpoints(straight)] == ["step-0000003", "step-0000004"]
    train_until_crash(monkeypatch, rm.train, config("resumed"), step=2)
    resumed = rm.train(config("resumed"))
    assert len(losses(resumed)) == 4 and losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    a, b = load_file(str(straight / "reward_head.safetensors")), load_file(str(resumed / "reward_head.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_without_the_clock_passing_a_short_run_writes_no_checkpoint(tiny_model, rm_data, tmp_path):
    out = rm.train(rm.RMConfig(model=str(tiny_model), data=str(rm_data[0]), out=str(tmp_path / "rm"), batch_size=8,
                               max_steps=2, warmup=1, max_length=128, progress=False))
    assert checkpoint.checkpoints(out) == []
