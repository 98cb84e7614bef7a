"""Convert a Hugging Face Llama checkpoint into a TensorRT-LLM checkpoint (config.json + rank{N}.safetensors).

Streaming: tensors are read one group at a time from the (possibly sharded) safetensors files and
appended to every rank file as they are produced, so peak memory tracks the largest tensor, not the
model. Output is written to a hidden temporary directory next to --output_dir and renamed into place
only when complete, so an interrupted run leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import click
import torch
from tqdm import tqdm

from steerlm.convert.hf_checkpoint import copy_sidecars
from steerlm.convert.stream import CheckpointReader, StreamingWriter, shape_dtype
from steerlm.convert.trtllm_ckpt import DTYPES, FormatError, Fp8Stats, LlamaDims, check_tp, rank_units, trtllm_config
from steerlm.files import staged_dir

DTYPE_CHOICES = ("float16", "bfloat16", "float32", "fp8")
STATS_FILE = "fp8_calibration.json"


def convert(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    tp_size: int = 1,
    dtype: str = "float16",
    *,
    fp8_stats: Fp8Stats | None = None,
    fp8_base_dtype: str = "float16",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the TensorRT-LLM checkpoint of `model_dir` to `output_dir`; returns the output path.

    dtype "fp8" needs `fp8_stats` (see steerlm.convert.calibrate); its non-linear tensors use `fp8_base_dtype`.
    """
    if dtype not in DTYPE_CHOICES:
        raise FormatError(f"--dtype {dtype!r}: choose from {', '.join(DTYPE_CHOICES)}")
    fp8 = dtype == "fp8"
    if fp8 and fp8_stats is None:
        raise FormatError("--dtype fp8 needs calibration statistics")
    if fp8 and fp8_base_dtype not in ("float16", "bfloat16"):
        raise FormatError(f"--fp8_base_dtype {fp8_base_dtype!r}: choose float16 or bfloat16")
    base = fp8_base_dtype if fp8 else dtype
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    dims = LlamaDims.from_model_dir(model_dir)
    check_tp(dims, tp_size)
    if output_dir.exists() and not overwrite:
        raise FormatError(f"--output_dir {output_dir} already exists (pass --overwrite to replace it)")
    reader = CheckpointReader(model_dir)
    torch_dtype = DTYPES[base]
    stats = fp8_stats if fp8 else None

    def meta(name: str) -> torch.Tensor:
        return torch.empty(reader.shape(name), dtype=reader.dtype(name), device="meta")

    # Pass 1 over shape-only tensors lays out every rank file; pass 2 writes the same tensors for real.
    layouts: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[] for _ in range(tp_size)]
    n_units = 0
    for unit in rank_units(meta, reader.__contains__, dims, tp_size, torch_dtype, stats):
        n_units += 1
        for r, tensors in enumerate(unit):
            layouts[r].extend((name, *shape_dtype(t)) for name, t in tensors)

    with staged_dir(output_dir) as tmp:
        metadata = {"format": "pt", "producer": "steerlm build/convert_checkpoint.py"}
        # Leaving the stack closes every rank file, or aborts them all when anything failed.
        with ExitStack() as stack:
            writers = [stack.enter_context(StreamingWriter(tmp / f"rank{r}.safetensors", layouts[r], metadata))
                       for r in range(tp_size)]
            units = rank_units(reader.get, reader.__contains__, dims, tp_size, torch_dtype, stats)
            for unit in tqdm(units, total=n_units, desc=f"convert tp={tp_size} {dtype}", disable=not progress):
                for writer, tensors in zip(writers, unit):
                    for name, tensor in tensors:
                        writer.write(name, tensor)
        copy_sidecars(model_dir, tmp)
        if stats is not None:
            (tmp / STATS_FILE).write_text(json.dumps(stats.to_json(), indent=1) + "\n")
        # config.json last: a directory with it is a finished checkpoint.
        config = trtllm_config(dims, tp_size, base, fp8)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return output_dir


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face Llama checkpoint (config.json + model.safetensors or a sharded index).")
@click.option("--output_dir", required=True, type=click.Path(), help="Where the TensorRT-LLM checkpoint goes.")
@click.option("--tp_size", default=1, show_default=True, type=int, help="Tensor-parallel size (= world size).")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(DTYPE_CHOICES),
              help="Weight dtype; fp8 = float8_e4m3fn linear weights with per-tensor scales (Hopper/Ada only).")
@click.option("--fp8_base_dtype", default="float16", show_default=True, type=click.Choice(["float16", "bfloat16"]),
              help="With --dtype fp8: dtype of embeddings, norms, lm_head and activations.")
@click.option("--calibrator", default="builtin", show_default=True, type=click.Choice(["builtin", "modelopt"]),
              help="With --dtype fp8: builtin PyTorch hooks, or NVIDIA ModelOpt (needs nvidia-modelopt and a GPU).")
@click.option("--calib_stats", type=click.Path(exists=True, dir_okay=False),
              help="With --dtype fp8: reuse a fp8_calibration.json written by an earlier conversion.")
@click.option("--overwrite", is_flag=True, help="Replace --output_dir if it exists.")
def main(model_dir, output_dir, tp_size, dtype, fp8_base_dtype, calibrator, calib_stats, overwrite) -> None:
    """Convert a Hugging Face Llama checkpoint to a TensorRT-LLM checkpoint."""
    from steerlm.convert.calibrate import CalibratorUnavailable, calibrate

    try:
        dims = LlamaDims.from_model_dir(model_dir)
        check_tp(dims, tp_size)
        stats = None
        if dtype == "fp8":
            if calib_stats:
                stats = Fp8Stats.from_json(json.loads(Path(calib_stats).read_text()))
            else:
                click.echo(f"calibrating FP8 scales with the {calibrator} calibrator ...", err=True)
                stats = calibrate(model_dir, calibrator)
        out = convert(model_dir, output_dir, tp_size, dtype, fp8_stats=stats, fp8_base_dtype=fp8_base_dtype,
                      overwrite=overwrite)
    except (FormatError, CalibratorUnavailable) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote TensorRT-LLM checkpoint (tp={tp_size}, dtype={dtype}) to {out}")
