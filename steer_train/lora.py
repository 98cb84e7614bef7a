"""LoRA through the `peft` library for `sft` and `rm`.

Only the adapter matrices (and, for `rm`, the new linear head) train; the base weights, embeddings included,
stay frozen, which is why new control tokens need distinct starting rows (`steer_train.control_tokens`).
The adapter is saved with the run in `OUT/adapter/` (peft's layout, loadable with `PeftModel.from_pretrained`);
with `--merge` the adapter is folded into the base weights and OUT becomes an ordinary checkpoint that
serving and `make engine` read unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

ADAPTER_DIR = "adapter"
# The attention and MLP projections of Llama-family blocks (HF names); `--lora-targets` overrides.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS


def parse_targets(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if not targets:
        raise ValueError("--lora-targets is empty; give module names such as q_proj,v_proj")
    return targets


def lora_settings(cfg) -> LoraSettings:
    """The settings of a TrainConfig's --lora-* options."""
    return LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, parse_targets(cfg.lora_targets))


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """`model` wrapped by peft with adapters on every module whose name ends in one of the targets; all other
    parameters frozen. A target that matches nothing is an error naming the modules that exist."""
    from peft import LoraConfig, get_peft_model

    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    unknown = [t for t in settings.targets if t not in leaf_names]
    if unknown:
        raise ValueError(f"--lora-targets {','.join(unknown)} match no linear layer; this model has {', '.join(leaf_names)}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none")
    return get_peft_model(model, config)


def trainable_count(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_adapter(peft_model, out: Path) -> Path:
    """The adapter weights and config in OUT/adapter; embeddings travel with it when the vocabulary grew."""
    path = out / ADAPTER_DIR
    peft_model.save_pretrained(path, save_embedding_layers="auto")
    return path


def merge(peft_model) -> torch.nn.Module:
    """The base model with the adapter folded into its weights (no peft wrapper left)."""
    return peft_model.merge_and_unload()
