"""Verify a converted checkpoint against the Hugging Face model it came from, without TensorRT-LLM.

Two kinds of converted checkpoint: the legacy TensorRT-LLM checkpoint (config.json + rank{N}.safetensors)
and the Hugging Face checkpoint `make engine` writes for the LLM API (16-bit, or FP8 in ModelOpt format,
seen through `hf_checkpoint.loader_view`: fused and requantized as the loaders do, split over TP ranks).
Runs `reference.TrtllmReference` (all ranks, tensor-parallel partials combined as the engine
does) and the Hugging Face model in float32 on sample SteerLM prompts, and compares the logits.
The error is reported relative to the largest reference logit so the tolerances mean the same for a
tiny random model and a 70B one. Exit status 0: within tolerance; 1: beyond it; 2: bad input.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from steerlm.convert.hf_checkpoint import loader_view
from steerlm.convert.prompts import sample_token_ids
from steerlm.convert.reference import TrtllmReference
from steerlm.convert.trtllm_ckpt import FormatError, load_config

# Per weight format: (max |error| / max |reference logit|, minimum top-1 agreement).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 0.99),
    "float16": (1e-2, 0.95),
    "bfloat16": (4e-2, 0.9),
    "fp8": (0.15, 0.85),
}


@dataclass(frozen=True)
class VerifyReport:
    kind: str
    tokens: int
    max_abs_err: float
    mean_abs_err: float
    rel_err: float
    top1_agreement: float
    tolerance: tuple[float, float]

    @property
    def passed(self) -> bool:
        return self.rel_err <= self.tolerance[0] and self.top1_agreement >= self.tolerance[1]

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict} [{self.kind}] {self.tokens} tokens: max abs err {self.max_abs_err:.3e}, "
            f"mean abs err {self.mean_abs_err:.3e}, relative err {self.rel_err:.3e} (tolerance {self.tolerance[0]:g}), "
            f"top-1 agreement {self.top1_agreement:.3f} (tolerance {self.tolerance[1]:g})"
        )


def checkpoint_kind(config: dict) -> str:
    return "fp8" if (config.get("quantization") or {}).get("quant_algo") == "FP8" else config["dtype"]


def load_reference(checkpoint_dir: str | os.PathLike, tp_size: int | None = None) -> TrtllmReference:
    """The reference forward of either checkpoint kind; `tp_size` splits a Hugging Face checkpoint
    (default: the TP recorded in its steerlm_engine.json, else 1)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    if "architecture" in config:  # TensorRT-LLM checkpoint: its TP is fixed by the rank files
        return TrtllmReference.from_dir(checkpoint_dir)
    if tp_size is None:
        record = checkpoint_dir / "steerlm_engine.json"
        tp_size = int(json.loads(record.read_text())["tp_size"]) if record.is_file() else 1
    return TrtllmReference(*loader_view(checkpoint_dir, tp_size))


def verify(checkpoint_dir: str | os.PathLike, model_dir: str | os.PathLike, max_len: int = 256,
           tp_size: int | None = None) -> VerifyReport:
    from transformers import AutoModelForCausalLM

    reference = load_reference(checkpoint_dir, tp_size)
    kind = checkpoint_kind(reference.config)
    if kind not in TOLERANCES:
        raise FormatError(f"checkpoint dtype {kind!r}: no tolerance known; expected one of {', '.join(TOLERANCES)}")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if hf.config.vocab_size != reference.config["vocab_size"]:
        raise FormatError(
            f"vocab_size differs: checkpoint {reference.config['vocab_size']}, model {hf.config.vocab_size}"
        )
    errs, refs, agree, total = [], [], 0, 0
    with torch.no_grad():
        for ids in sample_token_ids(model_dir, "verify", max_len):
            want = hf(input_ids=torch.tensor([ids])).logits[0].float()
            got = reference.forward(ids)
            errs.append((got - want).abs().flatten())
            refs.append(want.abs().amax())
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            total += len(ids)
    err = torch.cat(errs)
    return VerifyReport(
        kind=kind,
        tokens=total,
        max_abs_err=float(err.max()),
        mean_abs_err=float(err.mean()),
        rel_err=float(err.max() / torch.stack(refs).max()),
        top1_agreement=agree / total,
        tolerance=TOLERANCES[kind],
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="TensorRT-LLM checkpoint (convert_checkpoint.py) or Hugging Face/FP8 checkpoint (make engine).")
@click.option("--model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The Hugging Face checkpoint it was converted from.")
@click.option("--max_len", default=256, show_default=True, help="Truncate each sample prompt to this many tokens.")
@click.option("--tp_size", type=int, default=None,
              help="Hugging Face checkpoints: TP ranks to split it over as the loader does (default: its "
                   "steerlm_engine.json, else 1). TensorRT-LLM checkpoints carry their own.")
def main(checkpoint_dir, model_dir, max_len, tp_size) -> None:
    """Compare the logits of a converted checkpoint with its Hugging Face model; exit 1 beyond tolerance."""
    try:
        report = verify(checkpoint_dir, model_dir, max_len, tp_size)
    except FormatError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    click.echo(report.summary())
    sys.exit(0 if report.passed else 1)
