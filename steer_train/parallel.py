"""Data parallelism for the training loops: one process, DDP (every process holds the whole model) or FSDP2
(`torch.distributed.fsdp.fully_shard`: parameters, gradients and optimizer state sharded over processes).

FSDP2 shards each transformer block (the classes a Hugging Face model lists in `_no_split_modules`) and then
the root, so one block's full weights exist only while it computes. On a GPU with bf16 the policy is bf16
parameters and compute with fp32 gradient reduction over fp32 master shards. Its checkpoints are sharded
(`torch.distributed.checkpoint`: each process writes its own shards, a run resumes on any process count),
and the final export gathers a full state dict on rank 0 into an ordinary unsharded model, which the same
save code as for one process writes as Hugging Face safetensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from steer_train.config import TrainConfig
from steer_train.loop import Dist, barrier, init_dist, seed_all
from steer_train.lora import trainable_count
from steer_train.metrics import Metrics

STRATEGIES = ("auto", "ddp", "fsdp")
SHARDED_DIR = "sharded"


def resolve(strategy: str, d: Dist) -> str:
    """`auto`: DDP when several processes run (the small-model default), nothing for one."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--parallel {strategy!r} must be one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        return "ddp" if d.world > 1 else "none"
    return strategy


def block_classes(model: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def wrap(model: torch.nn.Module, d: Dist, mode: str, bf16: bool) -> torch.nn.Module:
    """The module the loop calls forward/backward on: `model` itself (none, fsdp: sharded in place) or DDP."""
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if d.world == 1:
            return model
        return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one process: FSDP2 still needs a process group (of one, in-memory store)
        dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    classes = block_classes(model)
    if not classes:
        raise ValueError("--parallel fsdp needs a Hugging Face model that names its blocks (_no_split_modules)")
    for m in model.modules():
        if type(m).__name__ in classes:
            fully_shard(m, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def accumulate(net: torch.nn.Module, mode: str, last: bool) -> contextlib.AbstractContextManager:
    """Gradient sync only on the last micro batch of a step (both wrappers average over processes)."""
    if mode == "ddp" and hasattr(net, "no_sync") and not last:
        return net.no_sync()
    if mode == "fsdp":
        net.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ---------------------------------------------------------------- sharded checkpoints


def sharded_checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / SHARDED_DIR / "meta.json").is_file() and not p.name.endswith(".tmp"))


def save_sharded(out: Path, step: int, model, opt, meta: dict, d: Dist, keep: int) -> Path:
    """Every process writes its shards of model and optimizer into a temp directory; rank 0 adds meta.json
    (step, scheduler) and renames it into place, so a checkpoint directory is complete or absent."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDED_DIR).mkdir(parents=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(model, opt)
    rng = {"torch": torch.get_rng_state()}
    if d.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(d.device)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))
    from safetensors.torch import save_file

    save_file(rng, str(tmp / SHARDED_DIR / f"rng-{d.rank}.safetensors"))
    barrier(d)
    if d.main:
        (tmp / SHARDED_DIR / "meta.json").write_text(json.dumps({"step": step, "world": d.world, **meta}))
        os.replace(tmp, final)
        for old in sharded_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def load_sharded(path: Path, model, opt, d: Dist) -> dict:
    """Load the latest sharded checkpoint into the (already sharded) model and optimizer; returns meta.json.
    The torch RNG comes back per rank when the process count is unchanged."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = json.loads((path / SHARDED_DIR / "meta.json").read_text())
    rng_file = path / SHARDED_DIR / f"rng-{d.rank}.safetensors"
    if rng_file.is_file() and meta.get("world") == d.world:
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    return meta


# ---------------------------------------------------------------- export


def gathered(model: torch.nn.Module, build: Callable[[], torch.nn.Module], d: Dist) -> torch.nn.Module | None:
    """Rank 0: an unsharded CPU copy of the FSDP-sharded `model`; other ranks: None (collective call).

    `build` makes the same module structure on the meta device (no memory); the gathered full state dict
    is assigned into it and the non-persistent buffers (e.g. rotary frequencies) are copied over."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    with torch.device("meta"):
        copy = build()
    copy.load_state_dict(full, assign=True, strict=True)
    buffers = dict(model.named_buffers())
    for name, buf in list(copy.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            module = copy.get_submodule(owner) if owner else copy
            persistent = leaf not in getattr(module, "_non_persistent_buffers_set", set())
            module.register_buffer(leaf, buffers[name].detach().to("cpu").clone(), persistent=persistent)
    if hasattr(copy, "tie_weights"):  # assign=True replaced the shared tensor of tied embeddings
        copy.tie_weights()
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy.eval()


# ---------------------------------------------------------------- one resume/save path for every mode


def start(cfg: TrainConfig) -> tuple[Dist, str]:
    """Check what no single setting can, join the process group (under torchrun), pick the parallel mode and
    seed every generator: the opening of every training loop."""
    if cfg.merge and not cfg.lora:
        raise ValueError("--merge folds a LoRA adapter into the base; it needs --lora")
    d = init_dist(cfg.device)
    mode = resolve(cfg.parallel, d)
    seed_all(cfg.seed)
    return d, mode


def finish(d: Dist) -> None:
    """The close of every training loop: wait for every process, then leave the process group. A gloo group
    left for interpreter exit can abort a rank after a complete run ("terminate called without an active
    exception", SIGABRT), which torchrun reports as a failed run."""
    barrier(d)
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def resume_run(cfg: TrainConfig, mode: str, model, opt, sched, d: Dist, total: int, **facts) -> tuple[int, Metrics]:
    """Resume from the newest checkpoint in cfg.out, if any, and open its metrics.jsonl; a fresh run first logs
    its settings, world size, parameter counts and `facts`. Returns the step to start from and the log."""
    out = Path(cfg.out)
    resumed = resume(out, mode, model, opt, sched, d)
    if resumed is not None and d.main:
        print(f"resuming from {out}/checkpoints at step {resumed}")
    metrics = Metrics(out / "metrics.jsonl", d.main, resumed)
    if d.main and resumed is None:
        n_train, n_all = trainable_count(model)
        metrics.log(event="start", step=0, config=asdict(cfg), world=d.world, **facts, total_steps=total,
                    parallel=mode, trainable_params=n_train, params=n_all)
    return resumed or 0, metrics


def resume(out: Path, mode: str, model, opt, sched, d: Dist) -> int | None:
    """Load the newest checkpoint of this run into model, optimizer and scheduler; returns its step, or None
    when there is none. FSDP reads sharded checkpoints, the other modes `steer_train.checkpoint` state."""
    from steer_train.checkpoint import load_latest, set_rng_state

    if mode == "fsdp":
        found = sharded_checkpoints(out)
        if not found:
            return None
        meta = load_sharded(found[-1], model, opt, d)
        sched.load_state_dict(meta["scheduler"])
        return meta["step"]
    state = load_latest(out)
    if state is None:
        return None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"]


def save(out: Path, step: int, mode: str, model, opt, sched, d: Dist, keep: int) -> None:
    """A checkpoint of every process's state (collective: all processes call it at the same step)."""
    from steer_train.checkpoint import rng_state, save_checkpoint

    if mode == "fsdp":
        save_sharded(out, step, model, opt, {"scheduler": sched.state_dict()}, d, keep)
        return
    if d.main:
        state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": rng_state()}
        save_checkpoint(out, step, state, keep)
    barrier(d)
