"""`make engine`: convert a Hugging Face SteerLM checkpoint, verify it, then build a TensorRT-LLM engine.

Steps: check the request (GPU vs dtype, KV heads vs TP) -> convert_checkpoint -> verify_checkpoint ->
trtllm-build -> copy the tokenizer and steerlm.json next to the engine.

Exit status: 0 engine built; 1 verification or trtllm-build failed; 2 bad request (e.g. FP8 on A100,
TP not allowed by the KV heads); 3 TensorRT-LLM is not installed: the verified checkpoint is ready
and the exact trtllm-build command to run on a GPU machine is printed.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from convert_checkpoint import convert, copy_sidecars
from trtllm_ckpt import FormatError, LlamaDims, check_tp

EXIT_VERIFY_FAILED = 1
EXIT_BAD_REQUEST = 2
EXIT_NO_TENSORRT_LLM = 3
GPUS = ("a100", "h100")
ENGINE_DTYPES = ("float16", "bfloat16", "fp8")
INSTALL_HINT = (
    "TensorRT-LLM is not installed in this environment, so no engine was built.\n"
    "Install it on a machine with an NVIDIA GPU from NVIDIA's package index:\n"
    "    pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm\n"
    "or run this command inside NVIDIA's Triton TensorRT-LLM container "
    "(nvcr.io/nvidia/tritonserver:<version>-trtllm-python-py3)."
)


@dataclass(frozen=True)
class BuildPlan:
    dtype: str
    tp_size: int
    max_batch_size: int = 64
    max_input_len: int = 3072
    max_seq_len: int = 4096
    max_num_tokens: int = 8192

    def trtllm_build_args(self, checkpoint_dir: Path, engine_dir: Path) -> list[str]:
        # The GEMM plugin speeds up fp16/bf16 GEMMs; FP8 GEMMs run best on TensorRT's own kernels.
        gemm = "disable" if self.dtype == "fp8" else "auto"
        return [
            "trtllm-build",
            "--checkpoint_dir", str(checkpoint_dir),
            "--output_dir", str(engine_dir),
            "--max_batch_size", str(self.max_batch_size),
            "--max_input_len", str(self.max_input_len),
            "--max_seq_len", str(self.max_seq_len),
            "--max_num_tokens", str(self.max_num_tokens),
            "--gemm_plugin", gemm,
            "--gpt_attention_plugin", "auto",
            "--remove_input_padding", "enable",
            "--paged_kv_cache", "enable",
            # Paged context FMHA is what lets the KV cache of the fixed system prompt be reused.
            "--use_paged_context_fmha", "enable",
            "--workers", str(self.tp_size),
        ]


def check_request(gpu: str, dtype: str, dims: LlamaDims, tp_size: int) -> None:
    """Raise FormatError for requests that cannot produce a working engine."""
    if gpu not in GPUS:
        raise FormatError(f"GPU={gpu!r}: choose one of {', '.join(GPUS)}")
    if dtype not in ENGINE_DTYPES:
        raise FormatError(f"DTYPE={dtype!r}: choose one of {', '.join(ENGINE_DTYPES)}")
    if dtype == "fp8" and gpu == "a100":
        raise FormatError(
            "DTYPE=fp8 is not possible on A100: FP8 needs SM89/SM90 (L40S, H100, H200) and A100 is SM80. "
            "Use DTYPE=float16 or DTYPE=bfloat16 on A100, or GPU=h100 for FP8."
        )
    check_tp(dims, tp_size)


def tensorrt_llm_available() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None and shutil.which("trtllm-build") is not None


def serve_command(model_dir: Path, engine_dir: Path, tp_size: int) -> str:
    return f"make serve MODEL={shlex.quote(str(model_dir))} BACKEND=trtllm ENGINE_DIR={shlex.quote(str(engine_dir))} TP={tp_size}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face SteerLM checkpoint (steer_train output, init-tiny, or nemo_to_hf output).")
@click.option("--tp_size", default=1, show_default=True, type=int, help="Tensor-parallel size = number of GPUs.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(ENGINE_DTYPES))
@click.option("--gpu", default="h100", show_default=True, type=click.Choice(GPUS),
              help="Target GPU; a100 builds fp16/bf16 only, h100 also FP8.")
@click.option("--output_dir", type=click.Path(), default=None,
              help="Default: runs/engines/<model>-tp<N>-<dtype>-<gpu>; holds checkpoint/ and engine/.")
@click.option("--calibrator", default="builtin", show_default=True, type=click.Choice(["builtin", "modelopt"]),
              help="FP8 calibrator (modelopt needs nvidia-modelopt and a GPU).")
@click.option("--max_batch_size", default=BuildPlan.max_batch_size, show_default=True)
@click.option("--max_input_len", default=BuildPlan.max_input_len, show_default=True)
@click.option("--max_seq_len", default=BuildPlan.max_seq_len, show_default=True)
@click.option("--max_num_tokens", default=BuildPlan.max_num_tokens, show_default=True)
def main(model_dir, tp_size, dtype, gpu, output_dir, calibrator, max_batch_size, max_input_len, max_seq_len,
         max_num_tokens) -> None:
    """Convert, verify and build a TensorRT-LLM engine for a SteerLM checkpoint."""
    from fp8_calib import CalibratorUnavailable, calibrate
    from verify_checkpoint import verify

    model_dir = Path(model_dir)
    out = Path(output_dir) if output_dir else Path("runs/engines") / f"{model_dir.resolve().name}-tp{tp_size}-{dtype}-{gpu}"
    checkpoint_dir, engine_dir = out / "checkpoint", out / "engine"
    plan = BuildPlan(dtype, tp_size, max_batch_size, max_input_len, max_seq_len, max_num_tokens)
    try:
        check_request(gpu, dtype, LlamaDims.from_model_dir(model_dir), tp_size)
        stats = None
        if dtype == "fp8":
            click.echo(f"[calibrate] FP8 scales with the {calibrator} calibrator ...")
            stats = calibrate(model_dir, calibrator)
        click.echo(f"[convert] writing the TensorRT-LLM checkpoint to {checkpoint_dir} ...")
        convert(model_dir, checkpoint_dir, tp_size, dtype, fp8_stats=stats, overwrite=True)
    except (FormatError, CalibratorUnavailable) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_BAD_REQUEST)

    click.echo("[verify] comparing the checkpoint against the Hugging Face model ...")
    report = verify(checkpoint_dir, model_dir)
    click.echo("      " + report.summary())
    if not report.passed:
        click.echo("Error: the converted checkpoint does not reproduce the model; no engine built.", err=True)
        sys.exit(EXIT_VERIFY_FAILED)

    args = plan.trtllm_build_args(checkpoint_dir, engine_dir)
    if not tensorrt_llm_available():
        click.echo(f"[build] stopped: {INSTALL_HINT}")
        click.echo(f"\nVerified TP-{tp_size} {dtype} checkpoint: {checkpoint_dir}")
        click.echo("On the GPU machine, build the engine with:\n    " + shlex.join(args))
        click.echo("then serve it (the model repository gets world size = TP) with:\n    "
                   + serve_command(model_dir, engine_dir, tp_size))
        sys.exit(EXIT_NO_TENSORRT_LLM)

    click.echo("[build] " + shlex.join(args))
    result = subprocess.run(args)
    if result.returncode:
        click.echo(f"Error: trtllm-build exited with status {result.returncode}", err=True)
        sys.exit(EXIT_VERIFY_FAILED)
    copy_sidecars(checkpoint_dir, engine_dir)
    click.echo(f"engine ready: {engine_dir}\nserve it with:\n    " + serve_command(model_dir, engine_dir, tp_size))


if __name__ == "__main__":
    main()
