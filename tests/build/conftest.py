"""Fixtures for the conversion tests: a tiny GQA Llama whose weights are scaled like a trained model.

The shared tiny_model keeps transformers' init (std 0.02), under which the MLP barely moves the logits,
so a wrong weight mapping could hide inside the fp16/FP8 tolerances. Rescaling every matrix to unit
gain makes every layer matter, which is what lets the verifier tell right from wrong.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def rescale_weights(model_dir: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                gain = 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * gain)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(model_dir)


@pytest.fixture(scope="session")
def gqa_model(tiny_model, tmp_path_factory) -> Path:
    """4 query heads, 2 KV heads (so TP 4 duplicates KV heads), vocab not a multiple of 4, unit-gain weights."""
    out = tmp_path_factory.mktemp("gqa") / "model"
    shutil.copytree(tiny_model, out)
    rescale_weights(out)
    return out


@pytest.fixture(scope="session")
def fp8_stats(gqa_model):
    from steerlm.convert.calibrate import calibrate

    return calibrate(gqa_model)


@pytest.fixture
def interrupt_nth_write(monkeypatch):
    """Call it with n: the n-th tensor any converter streams to disk raises KeyboardInterrupt (a Ctrl-C mid-write)."""
    from steerlm.convert.stream import StreamingWriter

    def arm(n: int) -> None:
        calls = {"n": 0}
        real_write = StreamingWriter.write

        def write_then_die(self, name, tensor):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            real_write(self, name, tensor)

        monkeypatch.setattr(StreamingWriter, "write", write_then_die)

    return arm
