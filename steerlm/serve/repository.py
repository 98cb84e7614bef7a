"""Render `model_repository/` (templates) into a Triton model repository for one checkpoint and backend.

The same ensemble serves both backends: `cpu` puts the PyTorch python model behind the `tensorrt_llm` name,
`trtllm` points NVIDIA's C++ `tensorrtllm` backend at a TensorRT-LLM engine directory.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[2] / "model_repository"
MARKER = ".steerlm-repository"
BACKENDS = ("cpu", "trtllm")
GENERATOR_MODELS = ("steerlm", "preprocessing", "tensorrt_llm", "postprocessing")


class RenderError(ValueError):
    """The repository cannot be rendered from these arguments."""


def _params(values: dict[str, object]) -> str:
    return "\n".join(
        f'parameters {{ key: "{k}", value: {{ string_value: "{v}" }} }}' for k, v in values.items()
    )


def generation_parameters(backend: str, model_dir: Path, engine_dir: Path | None, max_batch_size: int,
                          kv_cache_reuse: bool, kv_cache_free_gpu_mem_fraction: float) -> dict[str, object]:
    if backend == "cpu":
        return {"hf_model_dir": model_dir, "max_batch_size": max_batch_size}
    return {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": engine_dir,
        "max_beam_width": 1,
        "batch_scheduler_policy": "guaranteed_no_evict",
        "kv_cache_free_gpu_mem_fraction": kv_cache_free_gpu_mem_fraction,
        # The fixed system prompt is a shared prefix; reuse needs an engine built with paged context FMHA.
        "enable_kv_cache_reuse": str(kv_cache_reuse).lower(),
        "exclude_input_in_output": "true",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
    }


def render_repository(
    out: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    reward_model_dir: str | os.PathLike | None = None,
    *,
    backend: str = "cpu",
    engine_dir: str | os.PathLike | None = None,
    max_batch_size: int = 8,
    kv_cache_reuse: bool = True,
    kv_cache_free_gpu_mem_fraction: float = 0.9,
) -> Path:
    """Write the repository to `out` (replacing an earlier rendering there) and return its path.

    `model_dir` is the SteerLM checkpoint (tokenizer + steerlm.json; also the weights for `cpu`),
    `reward_model_dir` adds the `reward_model` model, `engine_dir` is the TensorRT-LLM engine for `trtllm`."""
    from steerlm.spec import load_spec

    if backend not in BACKENDS:
        raise RenderError(f"backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    if model_dir is None and reward_model_dir is None:
        raise RenderError("nothing to serve: give a model directory and/or a reward model directory")
    if max_batch_size < 1:
        raise RenderError(f"max_batch_size must be >= 1, got {max_batch_size}")
    values: dict[str, object] = {"max_batch_size": max_batch_size}
    models: list[str] = []
    if model_dir is not None:
        model_dir = Path(model_dir).resolve()
        spec = load_spec(model_dir)
        if spec.kind != "generator":
            raise RenderError(f"{model_dir} holds a {spec.kind!r}, not a SteerLM generator (steerlm.json kind)")
        if not (model_dir / "tokenizer.json").is_file():
            raise RenderError(f"{model_dir} has no tokenizer.json")
        if backend == "trtllm":
            if engine_dir is None:
                raise RenderError("backend trtllm needs --engine-dir (a TensorRT-LLM engine directory)")
            engine_dir = Path(engine_dir).resolve()
            if not engine_dir.is_dir():
                raise RenderError(f"engine directory {engine_dir} does not exist")
        values.update(
            model_dir=model_dir,
            triton_backend="python" if backend == "cpu" else "tensorrtllm",
            max_queue_delay_microseconds=0 if backend == "cpu" else 100,
            parameters=_params(generation_parameters(backend, model_dir, engine_dir, max_batch_size,
                                                     kv_cache_reuse, kv_cache_free_gpu_mem_fraction)),
        )
        models += GENERATOR_MODELS
    if reward_model_dir is not None:
        reward_model_dir = Path(reward_model_dir).resolve()
        spec = load_spec(reward_model_dir)
        if spec.kind != "reward_model":
            raise RenderError(f"{reward_model_dir} holds a {spec.kind!r}, not a reward model (steerlm.json kind)")
        values["reward_model_dir"] = reward_model_dir
        models.append("reward_model")

    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise RenderError(f"{out} exists and is not a rendered SteerLM repository; choose an empty or new directory")
    tmp = out.with_name(out.name + ".rendering")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in models:
        src, dst = TEMPLATES / name, tmp / name
        (dst / "1").mkdir(parents=True)
        text = (src / "config.pbtxt").read_text()
        try:
            (dst / "config.pbtxt").write_text(string.Template(text).substitute(values))
        except KeyError as exc:
            raise RenderError(f"template {src / 'config.pbtxt'} needs a value for {exc}") from None
        model_py = src / "1" / "model.py"
        if model_py.is_file() and not (name == "tensorrt_llm" and backend == "trtllm"):
            shutil.copy2(model_py, dst / "1" / "model.py")
    info = {"backend": backend, "model_dir": model_dir, "reward_model_dir": reward_model_dir,
            "engine_dir": engine_dir, "models": models}
    (tmp / MARKER).write_text(json.dumps(info, default=str, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
