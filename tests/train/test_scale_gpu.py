"""FSDP2 on a GPU: bf16 mixed precision and activation checkpointing, one process (CPU counterparts in
test_scale.py run everywhere)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 FSDP2 is exercised on CPU "
                                "in fp32 by test_scale.py)")


def test_bf16_fsdp2_with_activation_checkpointing_trains_on_cuda(tiny_model, tmp_path):
    from steer_train.config import SFTConfig
    from steer_train.sft import train
    from tests.train.traindata import steer_rows, write_conversations

    data = write_conversations(tmp_path / "data.jsonl", steer_rows(32))
    out = train(SFTConfig(model=str(tiny_model), data=str(data), out=str(tmp_path / "out"), seq_len=256, micro_batch=4,
                          lr=3e-3, max_steps=16, warmup=2, parallel="fsdp", bf16=True, grad_ckpt=True, device="cuda",
                          progress=False))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert records[0]["parallel"] == "fsdp" and len(steps) == 16
    assert steps[-1]["loss"] < steps[0]["loss"] / 2
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in steps)
    print(f"tokens/s {steps[-1]['tokens_per_s']:.0f}, peak memory {max(r['peak_mem_gib'] for r in steps):.3f} GiB")
    assert (out / "model.safetensors").is_file()
