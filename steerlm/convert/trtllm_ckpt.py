"""The TensorRT-LLM Llama checkpoint format: config.json and the per-rank tensors.

`rank_units()` is the single description of the mapping from Hugging Face names to TensorRT-LLM names
and tensor-parallel splits. The converter runs it twice: once over shape-only ("meta") tensors to lay
out every rank file's header, once over real tensors to write them, so header and data cannot disagree.
The verifier reads what it produced back with the same names and split rules.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from steerlm.convert.stream import Rows, Tensor

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FormatError(ValueError):
    """The source checkpoint or the requested layout cannot be converted."""


@dataclass(frozen=True)
class LlamaDims:
    """What the conversion needs from a Hugging Face Llama config.json."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: float
    rotary_scaling: dict | None
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, cfg: Mapping) -> "LlamaDims":
        archs = cfg.get("architectures") or []
        if archs != ["LlamaForCausalLM"] and cfg.get("model_type") != "llama":
            raise FormatError(f"config.json architectures={archs}: only LlamaForCausalLM checkpoints are supported")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise FormatError("config.json attention_bias/mlp_bias=true: Llama checkpoints with biases are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise FormatError(f"config.json hidden_act={cfg.get('hidden_act')!r}: only 'silu' (SwiGLU) is supported")
        heads = int(cfg["num_attention_heads"])
        # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        scaling = cfg.get("rope_scaling") if not cfg.get("rope_parameters") else (
            {"type": rope_type, **rope} if rope_type != "default" else None
        )
        return cls(
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_size=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
            rotary_base=theta,
            rotary_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> "LlamaDims":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FormatError(f"{path} not found: --model_dir must be a Hugging Face checkpoint directory")
        return cls.from_hf_config(json.loads(path.read_text()))


def check_tp(dims: LlamaDims, tp_size: int) -> None:
    """Raise FormatError when the model's head counts do not allow this tensor-parallel size."""
    if tp_size < 1:
        raise FormatError(f"--tp_size {tp_size}: must be >= 1")
    if dims.num_heads % tp_size:
        raise FormatError(f"--tp_size {tp_size}: num_attention_heads={dims.num_heads} is not divisible by it")
    kv = dims.num_kv_heads
    if kv % tp_size and tp_size % kv:
        ok = sorted({t for t in range(1, dims.num_heads + 1)
                     if dims.num_heads % t == 0 and (kv % t == 0 or t % kv == 0)})
        raise FormatError(
            f"--tp_size {tp_size}: num_key_value_heads={kv} must divide it or be divisible by it; "
            f"allowed TP sizes for this model: {', '.join(map(str, ok))}"
        )
    if dims.intermediate_size % tp_size:
        raise FormatError(f"--tp_size {tp_size}: intermediate_size={dims.intermediate_size} is not divisible by it")


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds; when there are fewer KV heads than ranks each is duplicated."""
    return max(num_kv_heads // tp_size, 1)


def padded_vocab(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def trtllm_config(dims: LlamaDims, tp_size: int, dtype: str, fp8: bool) -> dict:
    """config.json of the TensorRT-LLM checkpoint; `dtype` is the activation dtype (float16 for FP8)."""
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": dims.vocab_size,
        "max_position_embeddings": dims.max_position_embeddings,
        "hidden_size": dims.hidden_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "head_size": dims.head_size,
        "intermediate_size": dims.intermediate_size,
        "hidden_act": "silu",
        "norm_epsilon": dims.norm_epsilon,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": dims.rotary_base,
        "rotary_scaling": dims.rotary_scaling,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": dims.tie_word_embeddings,
        "mlp_bias": False,
        "attn_bias": False,
        "mapping": {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1},
        "quantization": {"quant_algo": "FP8" if fp8 else None, "kv_cache_quant_algo": "FP8" if fp8 else None},
    }


def dup_kv(w: torch.Tensor, num_kv_heads: int, tp_size: int) -> torch.Tensor:
    """Repeat each KV head tp/kv times in place ([h0, h0, h1, h1] for 2 heads on 4 ranks), as TensorRT-LLM does."""
    reps = tp_size // num_kv_heads
    head = w.shape[0] // num_kv_heads
    return w.reshape(num_kv_heads, 1, head, -1).expand(num_kv_heads, reps, head, w.shape[-1]).reshape(-1, w.shape[-1])


def split(w: torch.Tensor, tp_size: int, dim: int) -> list[torch.Tensor]:
    return list(torch.chunk(w, tp_size, dim=dim)) if tp_size > 1 else [w]


@dataclass(frozen=True)
class Fp8Stats:
    """Calibration results: input amax per HF linear module name, K/V output amax per layer."""

    act_amax: Mapping[str, float]
    kv_amax: Mapping[int, float]

    def act_scale(self, *modules: str) -> torch.Tensor:
        try:
            amax = max(float(self.act_amax[m]) for m in modules)
        except KeyError as exc:
            raise FormatError(f"calibration has no activation range for {exc.args[0]}") from None
        return torch.tensor([max(amax, 1e-12) / FP8_MAX], dtype=torch.float32)

    def kv_scale(self, layer: int) -> torch.Tensor:
        # ModelOpt's FP8 KV-cache recipe: amax/448 but never below 1.0.
        return torch.tensor([max(float(self.kv_amax[layer]) / FP8_MAX, 1.0)], dtype=torch.float32)

    def to_json(self) -> dict:
        return {"act_amax": dict(self.act_amax), "kv_amax": {str(k): v for k, v in self.kv_amax.items()}}

    @classmethod
    def from_json(cls, d: Mapping) -> "Fp8Stats":
        return cls(dict(d["act_amax"]), {int(k): float(v) for k, v in d["kv_amax"].items()})


def abs_max(w: torch.Tensor) -> torch.Tensor:
    """max |w| as a float32 scalar, without a float32 copy of `w` (min and max are exact in every dtype)."""
    lo, hi = torch.aminmax(w)
    return torch.maximum(hi.float(), lo.float().neg())


def weight_scale(*weights: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 scale amax/448 over the full (unsplit) weights; merged to the max for fused weights."""
    if weights[0].is_meta:  # the layout pass needs only the shape (and meta reductions import half of torch)
        return torch.empty(1, dtype=torch.float32, device="meta")
    amax = torch.stack([abs_max(w) for w in weights]).amax()
    return (amax.clamp(min=1e-12) / FP8_MAX).reshape(1)


QUANT_BLOCK = 1 << 20  # elements per float32 block: quantizing a block at a time keeps it in cache


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn(clamp(w / scale, +-448)), computed in float32 a block of rows at a time."""
    out = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    if w.is_meta or w.numel() == 0:
        return out
    scale = scale.to(w.device)
    rows, flat = (w, out) if w.dim() > 1 else (w.reshape(1, -1), out.reshape(1, -1))
    step = max(1, QUANT_BLOCK // max(1, rows[0].numel()))
    for i in range(0, rows.shape[0], step):
        # copy=True: w may already be float32 (or a read-only file mapping) and is divided in place here.
        block = rows[i : i + step].to(torch.float32, copy=True)
        flat[i : i + step].copy_(block.div_(scale).clamp_(-FP8_MAX, FP8_MAX))
    return out


Getter = Callable[[str], torch.Tensor]
# per rank: [(trtllm name, tensor or row parts), ...]; steerlm.convert.stream.joined makes one tensor of parts
Unit = list[list[tuple[str, Tensor | Rows]]]


def rank_units(
    get: Getter,
    has: Callable[[str], bool],
    dims: LlamaDims,
    tp_size: int,
    dtype: torch.dtype,
    fp8: Fp8Stats | None = None,
) -> Iterator[Unit]:
    """Yield, group by group, the tensors every rank file holds, in file order.

    `get` returns one Hugging Face tensor by name; each yielded group needs only a few of them, so the
    caller can write and drop it before the next one is read. With `fp8`, linear weights become
    float8_e4m3fn with per-tensor scales and `dtype` is the dtype of everything else.
    """

    def replicated(name: str, tensor: torch.Tensor) -> Unit:
        t = tensor.to(dtype)
        return [[(name, t)] for _ in range(tp_size)]

    def linear(prefix: str, shards: list[Rows], full: list[torch.Tensor], act: torch.Tensor | None) -> Unit:
        # Shards stay views (row parts, column slices) of the source: the writer copies them as they are.
        def one(parts: list[torch.Tensor]) -> Tensor | Rows:
            return parts[0] if len(parts) == 1 else parts

        if fp8 is None:
            return [[(f"{prefix}.weight", one([p.to(dtype) for p in s]))] for s in shards]
        scale = weight_scale(*full)
        return [
            [
                (f"{prefix}.weight", one([quantize_fp8(p, scale) for p in s])),
                (f"{prefix}.weights_scaling_factor", scale.clone()),
                (f"{prefix}.activation_scaling_factor", act.clone()),
            ]
            for s in shards
        ]

    yield replicated("transformer.vocab_embedding.weight", get("model.embed_tokens.weight"))
    kv_local = kv_heads_per_rank(dims.num_kv_heads, tp_size)
    for i in range(dims.num_layers):
        hf, trt = f"model.layers.{i}", f"transformer.layers.{i}"
        yield replicated(f"{trt}.input_layernorm.weight", get(f"{hf}.input_layernorm.weight"))

        q, k, v = (get(f"{hf}.self_attn.{p}_proj.weight") for p in "qkv")
        kd, vd = k, v
        if dims.num_kv_heads < tp_size:
            kd, vd = dup_kv(k, dims.num_kv_heads, tp_size), dup_kv(v, dims.num_kv_heads, tp_size)
        qs, ks, vs = split(q, tp_size, 0), split(kd, tp_size, 0), split(vd, tp_size, 0)
        assert ks[0].shape[0] == kv_local * dims.head_size
        qkv = [[qs[r], ks[r], vs[r]] for r in range(tp_size)]
        act = fp8.act_scale(*(f"{hf}.self_attn.{p}_proj" for p in "qkv")) if fp8 else None
        unit = linear(f"{trt}.attention.qkv", qkv, [q, k, v], act)
        if fp8 is not None:
            for r in range(tp_size):
                unit[r].append((f"{trt}.attention.kv_cache_scaling_factor", fp8.kv_scale(i)))
        yield unit
        del q, k, v, kd, vd, qs, ks, vs, qkv

        o = get(f"{hf}.self_attn.o_proj.weight")
        yield linear(f"{trt}.attention.dense", [[s] for s in split(o, tp_size, 1)], [o],
                     fp8.act_scale(f"{hf}.self_attn.o_proj") if fp8 else None)
        del o
        yield replicated(f"{trt}.post_layernorm.weight", get(f"{hf}.post_attention_layernorm.weight"))

        # TensorRT-LLM's mlp.fc is the SiLU branch (HF gate_proj) and mlp.gate is HF up_proj.
        mlp_act = fp8.act_scale(f"{hf}.mlp.gate_proj", f"{hf}.mlp.up_proj") if fp8 else None
        for trt_name, hf_name in (("mlp.fc", "gate_proj"), ("mlp.gate", "up_proj")):
            w = get(f"{hf}.mlp.{hf_name}.weight")
            yield linear(f"{trt}.{trt_name}", [[s] for s in split(w, tp_size, 0)], [w], mlp_act)
            del w
        d = get(f"{hf}.mlp.down_proj.weight")
        yield linear(f"{trt}.mlp.proj", [[s] for s in split(d, tp_size, 1)], [d],
                     fp8.act_scale(f"{hf}.mlp.down_proj") if fp8 else None)
        del d

    yield replicated("transformer.ln_f.weight", get("model.norm.weight"))
    tied = dims.tie_word_embeddings or not has("lm_head.weight")
    head = get("model.embed_tokens.weight" if tied else "lm_head.weight").to(dtype)
    pad = padded_vocab(dims.vocab_size, tp_size) - head.shape[0]
    if pad:
        head = torch.nn.functional.pad(head, (0, 0, 0, pad))
    # lm_head stays in the activation dtype even for FP8, as in ModelOpt's exports.
    yield [[("lm_head.weight", s)] for s in split(head, tp_size, 0)]


def load_config(checkpoint_dir: str | os.PathLike) -> dict:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"{path} not found: not a TensorRT-LLM checkpoint directory")
    return json.loads(path.read_text())
