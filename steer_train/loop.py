"""The pieces of a training step every loop here shares: torchrun setup, seeding, data order, LR schedule."""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str | None = None) -> Dist:
    """One process, or one of several started by torchrun (RANK/WORLD_SIZE set): gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, dev)


def all_sum(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` (a LambdaLR multiplier)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def on_gpu_unless_set(flag: bool | None, d: Dist) -> bool:
    """A TrainConfig switch left at None (bf16, grad_ckpt) is on exactly when training runs on a GPU."""
    return d.device.type == "cuda" if flag is None else flag


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch; it depends only on seed and epoch, so a resumed or multi-process run
    takes the same steps."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def adamw(groups: list[dict], **defaults) -> torch.optim.AdamW:
    """AdamW with one fused kernel over all parameters, as the `transformers` Trainer's default optimizer
    (`adamw_torch_fused`); torch's default on CPU is a loop of small ops per parameter."""
    return torch.optim.AdamW(groups, fused=True, **defaults)


def autocast(d: Dist, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
