"""`make engine`: plan, then write what TensorRT-LLM serves (build/build_engine.py is its command line).

Every run first prints the memory plan (from config.json alone) and refuses a deployment that cannot fit.
Then, by default (TensorRT-LLM LLM API, 1.0 and later), one directory the LLM API loads unchanged:
the Hugging Face checkpoint (16-bit, or FP8 in ModelOpt format with calibrated scales), tokenizer,
steerlm.json, extra_llm_api_options.yaml and steerlm_engine.json, verified by the pure-PyTorch reference
before it appears (staged, then renamed). With `--engine legacy` (TensorRT-LLM <= 1.2.x): the TensorRT-LLM
checkpoint, verification and trtllm-build.

Exit status: 0 done (or plan printed with --plan_only); 1 verification or trtllm-build failed; 2 bad request
(FP8 on A100, TP not allowed by the heads, plan does not fit, unreadable model); 3 legacy only: TensorRT-LLM
is not installed, the verified checkpoint is ready and the trtllm-build command to run is printed.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from steerlm.convert.calibrate import CalibratorUnavailable, calibrate
from steerlm.convert.hf_checkpoint import copy_sidecars, write_hf_checkpoint
from steerlm.convert.legacy import convert
from steerlm.convert.llmapi import ENGINE_INFO_FILE, LEGACY_VERSION, OPTIONS_FILE, record, write_llmapi_files
from steerlm.convert.plan import DTYPES, GPUS, MemoryPlan, check_fp8, plan, refusal
from steerlm.convert.trtllm_ckpt import FormatError
from steerlm.convert.verify import verify
from steerlm.files import staged_dir, write_json

EXIT_VERIFY_FAILED = 1
EXIT_BAD_REQUEST = 2
EXIT_NO_TENSORRT_LLM = 3
ENGINES = ("llmapi", "legacy")
DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN = 3072, 1024  # the Llama2-70B SteerLM card's deployment
DEFAULT_MAX_NUM_TOKENS = 8192
INSTALL_HINT = (
    "TensorRT-LLM is not installed in this environment, so no engine was built.\n"
    "Install it on a machine with an NVIDIA GPU from NVIDIA's package index:\n"
    "    pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm\n"
    "or run this command inside NVIDIA's Triton TensorRT-LLM container "
    "(nvcr.io/nvidia/tritonserver:<version>-trtllm-python-py3)."
)


class VerificationFailed(RuntimeError):
    """The converted checkpoint does not reproduce the model."""


@dataclass(frozen=True)
class LegacyBuild:
    dtype: str
    tp_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int

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
            "--kv_cache_type", "paged",
            # Paged context FMHA is what lets the KV cache of the fixed system prompt be reused.
            "--use_paged_context_fmha", "enable",
            "--workers", str(self.tp_size),
        ]


def tensorrt_llm_available() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None and shutil.which("trtllm-build") is not None


def tensorrt_llm_version() -> str:
    import tensorrt_llm

    return tensorrt_llm.__version__


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FormatError(f"{path} not found: MODEL must be a Hugging Face checkpoint directory "
                          "(import a .nemo first with build/nemo_to_hf.py)")
    return json.loads(path.read_text())


def make_plan(config: dict, tp_size: int, dtype: str, gpu: str, max_batch_size: int | None, max_seq_len: int,
              max_num_tokens: int) -> MemoryPlan:
    """The plan at `max_batch_size`, or at the GPU's default batch capped by what fits when it is None."""
    check_fp8(gpu, dtype)
    if max_batch_size is not None:
        return plan(config, tp_size, dtype, gpu, max_batch_size, max_seq_len, max_num_tokens)
    first = plan(config, tp_size, dtype, gpu, 1, max_seq_len, max_num_tokens)
    batch = max(1, min(GPUS[gpu].max_batch_size, first.largest_batch))
    return plan(config, tp_size, dtype, gpu, batch, max_seq_len, max_num_tokens)


def serve_command(out: Path, tp_size: int) -> str:
    return f"make serve MODEL={shlex.quote(str(out))} BACKEND=trtllm TP={tp_size}"


def trtllm_serve_command(out: Path, tp_size: int) -> str:
    return (f"trtllm-serve {shlex.quote(str(out))} --tp_size {tp_size} "
            f"--extra_llm_api_options {shlex.quote(str(out / OPTIONS_FILE))}")


def build_llmapi(model_dir: Path, out: Path, p: MemoryPlan, calibrator: str, base_dtype: str,
                 echo=click.echo) -> None:
    """Write the LLM API directory for plan `p` at `out`, verified before it is renamed into place."""
    stats = None
    if p.dtype == "fp8":
        echo(f"[calibrate] FP8 scales with the {calibrator} calibrator over SteerLM-template prompts ...")
        stats = calibrate(model_dir, calibrator)
    dtype = base_dtype if p.dtype == "fp8" else p.dtype
    with staged_dir(out) as tmp:
        echo(f"[convert] writing the {'FP8 (ModelOpt format)' if stats else dtype} checkpoint ...")
        write_hf_checkpoint(model_dir, tmp, dtype, stats)
        echo(f"[verify] reference forward at TP {p.tp_size} against the Hugging Face model ...")
        report = verify(tmp, model_dir, tp_size=p.tp_size)
        echo("      " + report.summary())
        if not report.passed:
            raise VerificationFailed("the converted checkpoint does not reproduce the model; nothing written")
        # Last: a directory with steerlm_engine.json is a finished, verified one.
        write_llmapi_files(tmp, p)


def build_legacy(model_dir: Path, out: Path, p: MemoryPlan, calibrator: str, max_input_len: int,
                 echo=click.echo) -> int:
    """Today's streaming TP conversion, verification and trtllm-build; returns the exit status."""
    checkpoint_dir, engine_dir = out / "checkpoint", out / "engine"
    # A record or engine left by an earlier run must not vouch for what this run builds.
    (out / ENGINE_INFO_FILE).unlink(missing_ok=True)
    shutil.rmtree(engine_dir, ignore_errors=True)
    stats = None
    if p.dtype == "fp8":
        echo(f"[calibrate] FP8 scales with the {calibrator} calibrator ...")
        stats = calibrate(model_dir, calibrator)
    echo(f"[convert] writing the TensorRT-LLM checkpoint to {checkpoint_dir} ...")
    convert(model_dir, checkpoint_dir, p.tp_size, p.dtype, fp8_stats=stats, overwrite=True)
    echo("[verify] comparing the checkpoint against the Hugging Face model ...")
    report = verify(checkpoint_dir, model_dir)
    echo("      " + report.summary())
    if not report.passed:
        raise VerificationFailed("the converted checkpoint does not reproduce the model; no engine built")
    build = LegacyBuild(p.dtype, p.tp_size, p.max_batch_size, max_input_len, p.max_seq_len, p.max_num_tokens)
    args = build.trtllm_build_args(checkpoint_dir, engine_dir)
    if not tensorrt_llm_available():
        echo(f"[build] stopped: {INSTALL_HINT}")
        echo(f"\nVerified TP-{p.tp_size} {p.dtype} checkpoint: {checkpoint_dir}")
        echo(f"On the GPU machine (tensorrt_llm{LEGACY_VERSION}), build the engine with:\n    " + shlex.join(args))
        echo("then serve it with:\n    " + serve_command(out, p.tp_size))
        return EXIT_NO_TENSORRT_LLM
    echo("[build] " + shlex.join(args))
    result = subprocess.run(args)
    if result.returncode:
        echo(f"Error: trtllm-build exited with status {result.returncode}", err=True)
        shutil.rmtree(engine_dir, ignore_errors=True)
        return EXIT_VERIFY_FAILED
    copy_sidecars(checkpoint_dir, engine_dir)
    # An engine runs only on the TensorRT-LLM release that built it.
    write_json(out / ENGINE_INFO_FILE, record(p, "legacy-engine", f"=={tensorrt_llm_version()}"))
    echo(f"engine ready: {engine_dir}\nserve it with:\n    " + serve_command(out, p.tp_size))
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face SteerLM checkpoint (steer_train output, init-tiny, or nemo_to_hf output).")
@click.option("--tp_size", default=1, show_default=True, type=int, help="Tensor-parallel size = number of GPUs.")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(DTYPES),
              help="Weights and KV cache: 16-bit, or FP8 (H100/H200 only).")
@click.option("--gpu", default="h100", show_default=True, type=click.Choice(list(GPUS)),
              help="Target GPU: its memory sizes the plan, its kind decides FP8, its defaults fill the options.")
@click.option("--output_dir", type=click.Path(), default=None,
              help="Default: runs/engines/<model>-tp<N>-<dtype>-<gpu>.")
@click.option("--engine", "engine_kind", default="llmapi", show_default=True, type=click.Choice(ENGINES),
              help="llmapi: Hugging Face checkpoint + LLM API options (TensorRT-LLM >= 1.0); "
                   "legacy: TensorRT-LLM checkpoint + trtllm-build (TensorRT-LLM <= 1.2.x).")
@click.option("--plan_only", is_flag=True, help="Print the memory plan and stop (make engine PLAN=1).")
@click.option("--calibrator", default="builtin", show_default=True, type=click.Choice(["builtin", "modelopt"]),
              help="FP8 calibrator (modelopt needs nvidia-modelopt and a GPU).")
@click.option("--fp8_base_dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16"]),
              help="With --dtype fp8: dtype of embeddings, norms, lm_head and activations.")
@click.option("--max_batch_size", type=int, default=None,
              help="Default: the GPU's default batch, capped by the largest batch the plan fits.")
@click.option("--max_input_len", default=DEFAULT_INPUT_LEN, show_default=True, type=int)
@click.option("--max_output_len", default=DEFAULT_OUTPUT_LEN, show_default=True, type=int,
              help="max_seq_len = max_input_len + max_output_len.")
@click.option("--max_num_tokens", default=DEFAULT_MAX_NUM_TOKENS, show_default=True, type=int,
              help="Tokens one forward step may batch (context chunks + decode rows).")
def main(model_dir, tp_size, dtype, gpu, output_dir, engine_kind, plan_only, calibrator, fp8_base_dtype,
         max_batch_size, max_input_len, max_output_len, max_num_tokens) -> None:
    """Plan, convert, verify and write what TensorRT-LLM serves for a SteerLM checkpoint."""
    model_dir = Path(model_dir)
    out = Path(output_dir) if output_dir else (
        Path("runs/engines") / f"{model_dir.resolve().name}-tp{tp_size}-{dtype}-{gpu}")
    try:
        config = read_config(model_dir)
        max_seq_len = max_input_len + max_output_len
        positions = int(config.get("max_position_embeddings") or max_seq_len)
        if max_seq_len > positions:
            # The model was trained on no longer sequences; the runtime would refuse or extrapolate RoPE.
            click.echo(f"note: max_seq_len {max_input_len} + {max_output_len} capped at the model's "
                       f"max_position_embeddings={positions}")
            max_seq_len, max_input_len = positions, min(max_input_len, positions - 1)
        p = make_plan(config, tp_size, dtype, gpu, max_batch_size, max_seq_len, max_num_tokens)
        click.echo(p.render())
        if not p.fits:
            raise FormatError(refusal(p, config))
        if plan_only:
            return
        if engine_kind == "legacy":
            sys.exit(build_legacy(model_dir, out, p, calibrator, max_input_len))
        build_llmapi(model_dir, out, p, calibrator, fp8_base_dtype)
    except (FormatError, CalibratorUnavailable) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_BAD_REQUEST)
    except VerificationFailed as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_VERIFY_FAILED)
    click.echo(f"\nready: {out} (TP {p.tp_size}, {p.dtype}, {p.gpu}; {OPTIONS_FILE}, {ENGINE_INFO_FILE})")
    click.echo("serve it with:\n    " + serve_command(out, p.tp_size))
    click.echo("or with TensorRT-LLM's own server:\n    " + trtllm_serve_command(out, p.tp_size))
