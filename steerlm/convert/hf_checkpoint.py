"""Hugging Face checkpoints for the TensorRT-LLM LLM API (and vLLM): 16-bit, or FP8 in NVIDIA ModelOpt's format.

The FP8 layout is the one ModelOpt's unified Hugging Face export writes and both loaders read:
- every decoder linear (q/k/v/o_proj, gate/up/down_proj): `<module>.weight` float8_e4m3fn [out, in],
  `<module>.weight_scale` and `<module>.input_scale` float32 scalars (shape []), per tensor, amax/448;
- K/V cache scales on the projections that produce them: `self_attn.k_proj.k_scale`, `self_attn.v_proj.v_scale`
  (float32 scalars);
- embeddings, norms and lm_head in 16 bits; lm_head is listed in `exclude_modules`;
- `hf_quant_config.json` {"producer", "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
  "exclude_modules": ["lm_head"]}} and the same in config.json `quantization_config` in the
  compressed-tensors style ModelOpt converts it to (quant_method "modelopt", kv_cache_scheme, ignore).
Loaders fuse q/k/v (and gate/up) into one GEMM with the largest of the weight scales, requantizing the
others, and the largest input scale; `loader_view` applies those rules so the verifier checks what runs.

Writing streams tensor by tensor (steerlm.convert.stream), so peak memory is one tensor group.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from steerlm.convert.stream import CheckpointReader, StreamingWriter, joined
from steerlm.convert.trtllm_ckpt import (
    DTYPES,
    FP8_MAX,
    FormatError,
    Fp8Stats,
    LlamaDims,
    quantize_fp8,
    rank_units,
    trtllm_config,
    weight_scale,
)

QUANT_CONFIG_FILE = "hf_quant_config.json"
WEIGHTS_FILE = "model.safetensors"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXCLUDE_MODULES = ["lm_head"]
PRODUCER = {"name": "steerlm", "version": "1"}
# Files the serving side reads next to the weights (tokenizer and the SteerLM spec).
SIDECAR_FILES = (
    "steerlm.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def copy_sidecars(src: Path, dst: Path) -> None:
    """Copy the SIDECAR_FILES that `src` has into `dst`."""
    for name in SIDECAR_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def hf_quant_config() -> dict:
    return {
        "producer": dict(PRODUCER),
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": list(EXCLUDE_MODULES)},
    }


def quantization_config() -> dict:
    """config.json `quantization_config`, as ModelOpt's convert_hf_quant_config_format writes it for FP8."""
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    return {
        "config_groups": {"group_0": {"input_activations": dict(fp8), "weights": dict(fp8), "targets": ["Linear"]}},
        "ignore": list(EXCLUDE_MODULES),
        "quant_algo": "FP8",
        "kv_cache_scheme": dict(fp8),
        "producer": dict(PRODUCER),
        "quant_method": "modelopt",
    }


def _scalar(x: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32).reshape(())


def hf_tensors(get: Callable[[str], torch.Tensor], has: Callable[[str], bool], dims: LlamaDims, dtype: torch.dtype,
               fp8: Fp8Stats | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the output checkpoint in file order, each produced from one or two source tensors."""
    yield "model.embed_tokens.weight", get("model.embed_tokens.weight").to(dtype)
    for i in range(dims.num_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", get(f"{p}.input_layernorm.weight").to(dtype)
        for module in LINEARS:
            if module == "mlp.gate_proj":
                yield f"{p}.post_attention_layernorm.weight", get(f"{p}.post_attention_layernorm.weight").to(dtype)
            w = get(f"{p}.{module}.weight")
            if fp8 is None:
                yield f"{p}.{module}.weight", w.to(dtype)
                continue
            scale = weight_scale(w).reshape(())
            yield f"{p}.{module}.weight", quantize_fp8(w, scale)
            yield f"{p}.{module}.weight_scale", scale.to(torch.float32)
            yield f"{p}.{module}.input_scale", _scalar(fp8.act_scale(f"{p}.{module}"))
            if module in ("self_attn.k_proj", "self_attn.v_proj"):
                yield f"{p}.{module}.{module[10]}_scale", _scalar(fp8.kv_scale(i))
            del w
    yield "model.norm.weight", get("model.norm.weight").to(dtype)
    if not dims.tie_word_embeddings:
        # An untied config whose checkpoint lacks lm_head (some exports) used the embeddings: write them out.
        yield "lm_head.weight", get("lm_head.weight" if has("lm_head.weight") else "model.embed_tokens.weight").to(dtype)


def write_hf_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str,
                        fp8: Fp8Stats | None = None, progress: bool = True) -> None:
    """Write the checkpoint of `model_dir` into the existing directory `out_dir` (the caller stages it).

    `dtype` is float16 or bfloat16: the weights' dtype, or with `fp8` that of everything not quantized.
    """
    if dtype not in ("float16", "bfloat16"):
        raise FormatError(f"dtype {dtype!r}: choose float16 or bfloat16")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    dims = LlamaDims.from_hf_config(config)
    reader = CheckpointReader(model_dir)
    torch_dtype = DTYPES[dtype]

    def meta(name: str) -> torch.Tensor:
        return torch.empty(reader.shape(name), dtype=reader.dtype(name), device="meta")

    # Pass 1 over shape-only tensors lays out the file header; pass 2 writes the same tensors for real.
    layout = [(n, tuple(t.shape), t.dtype) for n, t in hf_tensors(meta, reader.__contains__, dims, torch_dtype, fp8)]
    with StreamingWriter(out_dir / WEIGHTS_FILE, layout, {"format": "pt"}) as writer:
        tensors = hf_tensors(reader.get, reader.__contains__, dims, torch_dtype, fp8)
        for name, tensor in tqdm(tensors, total=len(layout), desc=f"write {'fp8' if fp8 else dtype}",
                                 disable=not progress):
            writer.write(name, tensor.contiguous())
    copy_sidecars(model_dir, out_dir)
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    if fp8 is not None:
        config["quantization_config"] = quantization_config()
        (out_dir / QUANT_CONFIG_FILE).write_text(json.dumps(hf_quant_config(), indent=4) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def is_fp8_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    path = Path(checkpoint_dir) / QUANT_CONFIG_FILE
    return path.is_file() and json.loads(path.read_text())["quantization"].get("quant_algo") == "FP8"


def loader_view(checkpoint_dir: str | os.PathLike, tp_size: int) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """The checkpoint as TensorRT-LLM/vLLM hold it on `tp_size` GPUs, in the TensorRT-LLM checkpoint layout.

    FP8 loaders fuse q/k/v and gate/up: each part is dequantized with its own weight scale and requantized
    with the largest one, and the fused GEMM takes the largest input scale; the KV cache gets one scale per
    layer. Returns (TensorRT-LLM config.json, per-rank tensors), which `TrtllmReference` runs.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    dims = LlamaDims.from_hf_config(config)
    fp8 = is_fp8_checkpoint(checkpoint_dir)
    base = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    with safe_open(checkpoint_dir / WEIGHTS_FILE, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}

    def need(name: str) -> torch.Tensor:
        try:
            return tensors[name]
        except KeyError:
            raise FormatError(f"{checkpoint_dir / WEIGHTS_FILE} has no tensor {name!r}") from None

    stats = None
    fused_scale: dict[str, torch.Tensor] = {}
    if fp8:
        act, kv = {}, {}
        for i in range(dims.num_layers):
            p = f"model.layers.{i}"
            for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)):
                names = [f"{p}.{m}" for m in group]
                for n in names:
                    if need(f"{n}.weight").dtype != torch.float8_e4m3fn:
                        raise FormatError(f"{n}.weight is {need(f'{n}.weight').dtype}, expected float8_e4m3fn")
                top = torch.stack([need(f"{n}.weight_scale").reshape(()) for n in names]).amax()
                top_in = torch.stack([need(f"{n}.input_scale").reshape(()) for n in names]).amax()
                for n in names:
                    fused_scale[n] = top
                    act[n] = float(top_in) * FP8_MAX
            kv_scale = max(float(need(f"{p}.self_attn.k_proj.k_scale")), float(need(f"{p}.self_attn.v_proj.v_scale")))
            kv[i] = kv_scale * FP8_MAX
        stats = Fp8Stats(act, kv)

    def get(name: str) -> torch.Tensor:
        w = need(name)
        module = name.removesuffix(".weight")
        if w.dtype != torch.float8_e4m3fn:
            return w.float()
        own = w.float() * need(f"{module}.weight_scale").reshape(())
        # The loader's requantization to the fused scale, then the GEMM's dequantization.
        return quantize_fp8(own, fused_scale[module]).float() * fused_scale[module]

    units = rank_units(get, tensors.__contains__, dims, tp_size, DTYPES[base], stats)
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for unit in units:
        for r, items in enumerate(unit):
            ranks[r].update((name, joined(t)) for name, t in items)
    return trtllm_config(dims, tp_size, base, fp8), ranks
