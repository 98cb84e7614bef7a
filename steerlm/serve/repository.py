"""Render `model_repository/` (templates) into a Triton model repository for one checkpoint and backend.

Every backend gets the same models: the `steerlm` ensemble (also as `ensemble`), `preprocessing` and
`generator`; the backend only chooses the generator's engine (`generation_engine`, see
`steerlm.serve.engines`) and where it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

from steerlm.serve.requests import DEFAULT_MAX_INPUT_BYTES, load_key

TEMPLATES = Path(__file__).resolve().parents[2] / "model_repository"
MARKER = ".steerlm-repository"
BACKENDS = ("cpu", "torch", "trtllm")
# backend -> the generator's engine (steerlm.serve.engines.ENGINES)
ENGINE_OF_BACKEND = {"cpu": "torch", "torch": "torch", "trtllm": "trtllm"}
ENSEMBLE_NAMES = ("steerlm", "ensemble")

# The ensemble's inputs: (name, Triton type, dims, required). Names and types are those of tensorrtllm_backend's
# `ensemble` (all_models/inflight_batcher_llm/ensemble/config.pbtxt, commit c2e65b88d852) where it has them.
ENSEMBLE_INPUTS: list[tuple[str, str, str, bool]] = [
    ("text_input", "TYPE_STRING", "1", True),
    ("max_tokens", "TYPE_INT32", "1", True),
    # Label form, e.g. "verbosity:4,creativity:1"; attributes left out take the model's defaults.
    ("attributes", "TYPE_STRING", "1", False),
    ("system", "TYPE_STRING", "1", False),
    # JSON list of earlier turns: [{"question": str, "answer": str, "attributes"|"labels": str (optional)}, ...]
    ("history", "TYPE_STRING", "1", False),
    ("stop_words", "TYPE_STRING", "-1", False),
    ("bad_words", "TYPE_STRING", "-1", False),
    ("stream", "TYPE_BOOL", "1", False),
    ("temperature", "TYPE_FP32", "1", False),
    ("top_k", "TYPE_INT32", "1", False),
    ("top_p", "TYPE_FP32", "1", False),
    ("seed", "TYPE_UINT64", "1", False),
    ("end_id", "TYPE_INT32", "1", False),
    ("pad_id", "TYPE_INT32", "1", False),
    ("min_tokens", "TYPE_INT32", "1", False),
    # min_tokens under the name genai-perf's tensorrtllm converter sends with --output-tokens-mean-deterministic
    # (perf_analyzer genai-perf/genai_perf/inputs/converters/tensorrtllm_converter.py, commit ceccbfa04026).
    ("min_length", "TYPE_INT32", "1", False),
    ("repetition_penalty", "TYPE_FP32", "1", False),
    ("presence_penalty", "TYPE_FP32", "1", False),
    ("frequency_penalty", "TYPE_FP32", "1", False),
    ("beam_width", "TYPE_INT32", "1", False),
    ("num_return_sequences", "TYPE_INT32", "1", False),
    ("exclude_input_in_output", "TYPE_BOOL", "1", False),
    ("return_num_input_tokens", "TYPE_BOOL", "1", False),
    ("return_num_output_tokens", "TYPE_BOOL", "1", False),
]


class RenderError(ValueError):
    """The repository cannot be rendered from these arguments."""


def _inputs() -> str:
    return ",\n".join(f'  {{ name: "{n}", data_type: {t}, dims: [ {d} ]{"" if req else ", optional: true"} }}'
                       for n, t, d, req in ENSEMBLE_INPUTS)


def _input_maps() -> str:
    return "\n".join(f'      input_map {{ key: "{n}", value: "{n}" }}' for n, *_ in ENSEMBLE_INPUTS)


def _pbtxt_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _spec(model_dir: Path):
    from steerlm.spec import load_spec

    try:
        return load_spec(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RenderError(f"{model_dir / 'steerlm.json'}: {exc}") from None


def render_repository(
    out: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    reward_model_dir: str | os.PathLike | None = None,
    *,
    backend: str = "cpu",
    engine_dir: str | os.PathLike | None = None,
    max_batch_size: int = 8,
    device: str | None = None,
    engine_options: dict | None = None,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    preprocessing_instances: int = 2,
    stall_timeout: float = 120.0,
) -> Path:
    """Write the repository to `out` (replacing an earlier rendering there) and return its path.

    `model_dir` is the SteerLM checkpoint (tokenizer + steerlm.json; also the weights for torch),
    `reward_model_dir` adds the `reward_model` model, `engine_dir` is what `make engine` wrote (trtllm).
    `device` places the torch engine (cpu, cuda, cuda:N); `engine_options` go to the engine's factory."""
    if backend not in BACKENDS:
        raise RenderError(f"backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    if model_dir is None and reward_model_dir is None:
        raise RenderError("nothing to serve: give a model directory and/or a reward model directory")
    if max_batch_size < 1:
        raise RenderError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_input_bytes < 1 or preprocessing_instances < 1 or stall_timeout <= 0:
        raise RenderError("max_input_bytes and preprocessing_instances must be >= 1 and stall_timeout > 0")
    if backend == "cpu" and device not in (None, "cpu"):
        raise RenderError(f"backend cpu runs on the CPU; use backend torch for device {device!r}")
    values: dict[str, object] = {"max_batch_size": max_batch_size}
    models: list[str] = []
    if model_dir is not None:
        model_dir = Path(model_dir).resolve()
        spec = _spec(model_dir)
        if spec.kind != "generator":
            raise RenderError(f"{model_dir} holds a {spec.kind!r}, not a SteerLM generator (steerlm.json kind)")
        if not (model_dir / "tokenizer.json").is_file():
            raise RenderError(f"{model_dir} has no tokenizer.json")
        options = dict(engine_options or {})
        if ENGINE_OF_BACKEND[backend] == "torch":
            options["device"] = device or "cpu"
        elif engine_dir is not None:
            engine_dir = Path(engine_dir).resolve()
            if not engine_dir.is_dir():
                raise RenderError(f"engine directory {engine_dir} does not exist")
        values.update(
            model_dir=model_dir,
            generation_engine=ENGINE_OF_BACKEND[backend],
            engine_dir=engine_dir or "",
            engine_options=_pbtxt_string(json.dumps(options)),
            stall_timeout=stall_timeout,
            max_input_bytes=max_input_bytes,
            preprocessing_instances=preprocessing_instances,
            inputs=_inputs(),
            input_maps=_input_maps(),
        )
        models += ["preprocessing", "generator", *ENSEMBLE_NAMES]
    if reward_model_dir is not None:
        reward_model_dir = Path(reward_model_dir).resolve()
        spec = _spec(reward_model_dir)
        if spec.kind != "reward_model":
            raise RenderError(f"{reward_model_dir} holds a {spec.kind!r}, not a reward model (steerlm.json kind)")
        values["reward_model_dir"] = reward_model_dir
        models.append("reward_model")

    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise RenderError(f"{out} exists and is not a rendered SteerLM repository; choose an empty or new directory")
    tmp = out.with_name(out.name + ".rendering")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    load_key(tmp, create=True)
    for name in models:
        src, dst = TEMPLATES / ("steerlm" if name in ENSEMBLE_NAMES else name), tmp / name
        (dst / "1").mkdir(parents=True)
        text = (src / "config.pbtxt").read_text()
        try:
            (dst / "config.pbtxt").write_text(string.Template(text).substitute(values, ensemble_name=name))
        except KeyError as exc:
            raise RenderError(f"template {src / 'config.pbtxt'} needs a value for {exc}") from None
        model_py = src / "1" / "model.py"
        if model_py.is_file():
            shutil.copy2(model_py, dst / "1" / "model.py")
    info = {"backend": backend, "model_dir": model_dir, "reward_model_dir": reward_model_dir,
            "engine_dir": engine_dir, "models": models}
    (tmp / MARKER).write_text(json.dumps(info, default=str, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
