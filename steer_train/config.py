"""Training settings: each dataclass field is the only home of its default and its help text.

`python -m steer_train rm|sft|bootstrap` generate their options from these fields (`cli_train.config_options`),
the way TRL's `RewardConfig` carries the defaults and help of its trainer; a field without help (`model`,
`data`, ...) is given by the command itself because its help differs per command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its command-line help (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(kw_only=True)
class TrainConfig:
    """What every training loop (rm, sft) takes: data, output, optimisation and device settings."""

    model: str
    data: str
    out: str
    val_data: str | None = None
    schema: str | None = None  # preset, only for a base without steerlm.json
    lr: float = setting(1e-4, "Peak learning rate.")
    min_lr_ratio: float = setting(0.1, "Final LR as a fraction of --lr (cosine).")
    warmup: int = setting(10, "Linear warm-up steps.")
    epochs: float = setting(1.0, "Passes over the data.")
    max_steps: int | None = setting(None, "Optimizer steps (overrides --epochs).")
    grad_accum: int = setting(1, "Micro batches per optimizer step and process.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    grad_clip: float = setting(1.0, "Max gradient norm (0: off).")
    seed: int = setting(0, "Seed for data order and sampling.")
    bf16: bool | None = setting(None, "bf16 autocast (default: on GPU only).")
    grad_ckpt: bool | None = setting(None, "Gradient checkpointing (default: on GPU only).")
    device: str | None = setting(None, "cpu or cuda (default: cuda when available).")
    progress: bool = setting(True, "Progress bar.")
    parallel: str = setting("auto", "Data parallelism under torchrun: ddp (whole model per process, small models), "
                            "fsdp (FSDP2: parameters, gradients and optimizer state sharded); auto: ddp.",
                            choices=("auto", "ddp", "fsdp"))
    lora: bool = setting(False, "Train LoRA adapters (peft) instead of all weights; saved in OUT/adapter.")
    lora_r: int = setting(16, "LoRA rank.")
    lora_alpha: int = setting(32, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = setting(0.0, "Dropout on the LoRA input.")
    lora_targets: str = setting("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                "Comma-separated names of the linear layers that get adapters.")
    merge: bool = setting(False, "With --lora: also fold the adapter into the base and write OUT as an ordinary "
                          "checkpoint that serving and `make engine` read.")
    save_every: int = setting(0, "Also checkpoint every N optimizer steps and at the last (0: by time only).")
    save_minutes: float = setting(30.0, "Checkpoint when this many minutes have passed since the last one, so a "
                                        "killed run resumes from there (0: off).")
    keep: int = setting(2, "Checkpoints kept (0: all).")


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    seq_len: int = setting(1024, "Packed block length in tokens.")
    micro_batch: int = setting(1, "Packed blocks per micro batch and process.")
    eval_every: int = setting(0, "Validation loss every N steps (and at the end).")


@dataclass(kw_only=True)
class RMConfig(TrainConfig):
    pooling: str = setting("auto", "auto: mean for encoders (BERT family), last token otherwise.",
                           choices=("auto", "last", "mean"))
    max_length: int = setting(1024, "Tokens kept per conversation (its end).")
    batch_size: int = setting(8, "Conversations per micro batch and process.")
    head_lr: float | None = setting(None, "Learning rate of the new linear head (default 10x --lr).")
    loss: str = setting("regression", "regression: masked MSE on attribute labels (conversation JSONL); regular_bt, "
                        "margin_bt, scaled_bt: NeMo-Aligner's Bradley-Terry losses on preference pairs (prepare's "
                        "HelpSteer2-Preference output).", choices=("regression", "regular_bt", "margin_bt", "scaled_bt"))
    reward_attribute: str = setting("helpfulness", "With a Bradley-Terry loss: the attribute output that is the "
                                    "reward (NeMo-Aligner uses helpfulness).")
    attribute_weights: str | None = setting(None, "Scalar reward served next to the scores, e.g. "
                                            "helpfulness=0.65,correctness=0.8 (unnamed attributes weigh 0).")
