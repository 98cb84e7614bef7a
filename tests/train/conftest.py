"""Fixtures for the training tests: planted-signal data and a trained reward model / SFT model, shared per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.traindata import length_rows, steer_rows, write_conversations


@pytest.fixture(scope="session")
def rm_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rm_data")
    return write_conversations(root / "train.jsonl", length_rows(160, 1)), write_conversations(root / "val.jsonl", length_rows(40, 2))


@pytest.fixture(scope="session")
def trained_rm(tiny_model, rm_data, tmp_path_factory) -> Path:
    from steer_train.rm import RMConfig, train

    train_path, val_path = rm_data
    out = tmp_path_factory.mktemp("rm") / "rm"
    return train(RMConfig(model=str(tiny_model), data=str(train_path), val_data=str(val_path), out=str(out),
                          batch_size=16, lr=5e-3, epochs=4, warmup=3, max_length=256, progress=False))


@pytest.fixture(scope="session")
def steer_sft(tiny_model, tmp_path_factory) -> Path:
    """A tiny model fine-tuned on the planted verbosity signal."""
    from steer_train.sft import SFTConfig, train

    root = tmp_path_factory.mktemp("steer")
    data = write_conversations(root / "train.jsonl", steer_rows(64))
    return train(SFTConfig(model=str(tiny_model), data=str(data), out=str(root / "sft"), seq_len=256,
                           lr=3e-3, epochs=12, warmup=3, progress=False))
