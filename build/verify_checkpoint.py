"""Verify a TensorRT-LLM checkpoint against the Hugging Face model it came from, without TensorRT-LLM.

Runs `trtllm_reference.TrtllmReference` (all ranks, tensor-parallel partials combined as the engine
does) and the Hugging Face model in float32 on sample SteerLM prompts, and compares the logits.
The error is reported relative to the largest reference logit so the tolerances mean the same for a
tiny random model and a 70B one. Exit status 0: within tolerance; 1: beyond it; 2: bad input.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import click
import torch
from sample_prompts import sample_token_ids
from trtllm_ckpt import FormatError, load_config
from trtllm_reference import TrtllmReference

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


def verify(checkpoint_dir: str | os.PathLike, model_dir: str | os.PathLike, max_len: int = 256) -> VerifyReport:
    from transformers import AutoModelForCausalLM

    kind = checkpoint_kind(load_config(checkpoint_dir))
    if kind not in TOLERANCES:
        raise FormatError(f"checkpoint dtype {kind!r}: no tolerance known; expected one of {', '.join(TOLERANCES)}")
    reference = TrtllmReference(checkpoint_dir)
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
              help="TensorRT-LLM checkpoint written by convert_checkpoint.py.")
@click.option("--model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The Hugging Face checkpoint it was converted from.")
@click.option("--max_len", default=256, show_default=True, help="Truncate each sample prompt to this many tokens.")
def main(checkpoint_dir, model_dir, max_len) -> None:
    """Compare the logits of a TensorRT-LLM checkpoint with its Hugging Face model; exit 1 beyond tolerance."""
    try:
        report = verify(checkpoint_dir, model_dir, max_len)
    except FormatError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    click.echo(report.summary())
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
