"""Pieces every training loop here shares: torchrun setup, schedule, checkpoints, metrics and the loss plot."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from steerlm.spec import SteerSpec, load_spec, save_spec
from steerlm.template import PromptTemplate


@dataclass(kw_only=True)
class TrainConfig:
    """What every training loop (rm, sft) takes: data, output, optimisation and device settings."""

    model: str
    data: str
    out: str
    val_data: str | None = None
    schema: str | None = None  # preset, only for a base without steerlm.json
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    epochs: float = 1.0
    max_steps: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool | None = None  # None: on GPU only
    grad_ckpt: bool | None = None  # None: on GPU only
    device: str | None = None
    progress: bool = True


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


def autocast(d: Dist, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def base_spec(model_dir: str | os.PathLike, preset: str | None) -> SteerSpec:
    """The base checkpoint's steerlm.json, or a preset schema with the default template for a plain HF model."""
    if (Path(model_dir) / "steerlm.json").is_file():
        spec = load_spec(model_dir)
        if preset and SteerSpec.preset(preset).schema != spec.schema:
            raise ValueError(f"--schema {preset} differs from the schema in {model_dir}/steerlm.json")
        return spec
    return SteerSpec.preset(preset or "helpsteer")


def ensure_control_tokens(model: torch.nn.Module, hf_tokenizer, template: PromptTemplate) -> list[str]:
    """Add the template's control tokens as special tokens when the base lacks them (e.g. SmolLM2), resizing
    the embeddings; returns what was added."""
    from tokenizers import AddedToken

    vocab = hf_tokenizer.get_vocab()
    missing = [t for t in template.control_tokens if t not in vocab]
    if missing:
        hf_tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        model.resize_token_embeddings(len(hf_tokenizer))
    return missing


# ---------------------------------------------------------------- checkpoints


def checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if root.is_dir() else []


def save_checkpoint(out: Path, step: int, state: dict, keep: int) -> Path:
    """Write to a temp directory and rename it into place: a checkpoint directory is complete or absent."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    os.replace(tmp, final)
    for old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(out: Path) -> dict | None:
    found = checkpoints(out)
    return torch.load(found[-1] / "state.pt", map_location="cpu", weights_only=False) if found else None


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


def save_generator(out: Path, model, hf_tokenizer, spec: SteerSpec) -> Path:
    """A Hugging Face checkpoint the server serves and build/ converts: safetensors weights, tokenizer with the
    chat template, generation config stopping at the turn end, and steerlm.json written last."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    stop_id = hf_tokenizer.convert_tokens_to_ids(spec.template.stop_strings[0])
    pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else stop_id
    model.config.eos_token_id = stop_id
    model.config.pad_token_id = pad_id
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=stop_id, pad_token_id=pad_id
    )
    model.save_pretrained(tmp, safe_serialization=True)
    # The base's own chat template (e.g. ChatML) must not outlive the switch to the SteerLM template.
    hf_tokenizer.chat_template = spec.template.chat_template()
    hf_tokenizer.save_pretrained(tmp)
    save_spec(tmp, SteerSpec(spec.schema, spec.template, "generator", spec.extra))
    (out / "steerlm.json").unlink(missing_ok=True)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != "steerlm.json"] + ["steerlm.json"]:
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    return out


# ---------------------------------------------------------------- metrics


class Metrics:
    """metrics.jsonl in the run directory (main process only). On resume, records after the checkpoint go."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step is not None and path.is_file():
            keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in keep))

    def log(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def plot_losses(metrics: Path, png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return png
