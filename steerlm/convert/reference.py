"""A pure-PyTorch forward pass over a TensorRT-LLM Llama checkpoint, computed the way the engine computes it.

Every rank runs its own shard: column-parallel outputs (qkv, fc, gate, lm_head) stay local to the rank
and are gathered only at the end (lm_head), row-parallel outputs (dense, proj) are partial sums that
are all-reduced. FP8 weights are dequantized with their scales and the inputs of every FP8 linear and
the K/V cache are fake-quantized with their calibrated scales; fp16/bf16 activations are rounded to
that dtype between operations. Nothing here imports TensorRT-LLM.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from steerlm.convert.trtllm_ckpt import DTYPES, FormatError, kv_heads_per_rank, load_config, quantize_fp8


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quantize_fp8(x, scale).float() * scale


class TrtllmReference:
    def __init__(self, config: dict, ranks: list[dict[str, torch.Tensor]]) -> None:
        self.config = cfg = config
        mapping = cfg["mapping"]
        if mapping.get("pp_size", 1) != 1:
            raise FormatError("pipeline-parallel checkpoints are not supported by the reference forward")
        self.tp = int(mapping["tp_size"])
        if len(ranks) != self.tp:
            raise FormatError(f"{len(ranks)} rank(s) of tensors for tp_size={self.tp}")
        self.fp8_kv = (cfg.get("quantization") or {}).get("kv_cache_quant_algo") == "FP8"
        self.act_dtype = DTYPES[cfg["dtype"]]
        self.ranks = ranks
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head_size = cfg.get("head_size") or cfg["hidden_size"] // self.heads
        self.inv_freq = _inv_freq(self.head_size, float(cfg.get("rotary_base", 10000.0)), cfg.get("rotary_scaling"))

    @classmethod
    def from_dir(cls, checkpoint_dir: str | os.PathLike) -> "TrtllmReference":
        """A TensorRT-LLM checkpoint directory (config.json + rank{N}.safetensors)."""
        directory = Path(checkpoint_dir)
        config = load_config(directory)
        ranks = []
        for r in range(int(config["mapping"]["tp_size"])):
            path = directory / f"rank{r}.safetensors"
            if not path.is_file():
                raise FormatError(f"{path} missing: config.json declares tp_size={config['mapping']['tp_size']}")
            ranks.append(load_file(path))
        return cls(config, ranks)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.act_dtype).float()

    def _t(self, rank: int, name: str) -> torch.Tensor:
        try:
            return self.ranks[rank][name]
        except KeyError:
            raise FormatError(f"rank{rank}.safetensors has no tensor {name!r}") from None

    def _linear(self, rank: int, prefix: str, x: torch.Tensor) -> torch.Tensor:
        w = self._t(rank, f"{prefix}.weight")
        if w.dtype == torch.float8_e4m3fn:
            w = w.float() * self._t(rank, f"{prefix}.weights_scaling_factor")
            x = fake_quant_fp8(x, self._t(rank, f"{prefix}.activation_scaling_factor"))
        return self._round(x @ w.float().T)

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self._t(0, name).float()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config["norm_epsilon"])
        return self._round(y * w)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        # rope_gpt_neox: rotate the halves (i, i + d/2) of each head, as Hugging Face Llama does.
        pos = torch.arange(x.shape[0], dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _attention(self, rank: int, layer: int, h: torch.Tensor) -> torch.Tensor:
        prefix = f"transformer.layers.{layer}.attention"
        qkv = self._linear(rank, f"{prefix}.qkv", h)
        d = self.head_size
        q_local = self.heads // self.tp
        kv_local = kv_heads_per_rank(self.kv_heads, self.tp)
        if qkv.shape[-1] != (q_local + 2 * kv_local) * d:
            raise FormatError(f"rank{rank} {prefix}.qkv has {qkv.shape[-1]} rows, expected {(q_local + 2 * kv_local) * d}")
        q, k, v = qkv.split([q_local * d, kv_local * d, kv_local * d], -1)
        t = h.shape[0]
        q = self._rope(q.reshape(t, q_local, d))
        k = self._rope(k.reshape(t, kv_local, d))
        v = v.reshape(t, kv_local, d)
        if self.fp8_kv:
            kv_scale = self._t(rank, f"{prefix}.kv_cache_scaling_factor")
            k, v = fake_quant_fp8(k, kv_scale), fake_quant_fp8(v, kv_scale)
        group = q_local // kv_local
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        out = self._round(torch.einsum("hqk,khd->qhd", probs, v).reshape(t, q_local * d))
        return self._linear(rank, f"{prefix}.dense", out)

    def _mlp(self, rank: int, layer: int, h: torch.Tensor) -> torch.Tensor:
        prefix = f"transformer.layers.{layer}.mlp"
        act = torch.nn.functional.silu(self._linear(rank, f"{prefix}.fc", h)) * self._linear(rank, f"{prefix}.gate", h)
        return self._linear(rank, f"{prefix}.proj", self._round(act))

    @torch.no_grad()
    def forward(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab_size] in float32 for one sequence."""
        cfg = self.config
        x = self._t(0, "transformer.vocab_embedding.weight")[torch.tensor(ids)].float()
        for i in range(cfg["num_hidden_layers"]):
            h = self._rms(x, f"transformer.layers.{i}.input_layernorm.weight")
            # Row-parallel outputs: every rank's partial sum, all-reduced.
            x = self._round(x + sum(self._attention(r, i, h) for r in range(self.tp)))
            h = self._rms(x, f"transformer.layers.{i}.post_layernorm.weight")
            x = self._round(x + sum(self._mlp(r, i, h) for r in range(self.tp)))
        h = self._rms(x, "transformer.ln_f.weight")
        # Column-parallel lm_head: each rank's vocab slice, gathered; padding rows dropped.
        logits = torch.cat([h @ self._t(r, "lm_head.weight").float().T for r in range(self.tp)], -1)
        return logits[:, : cfg["vocab_size"]]


def _inv_freq(dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    kind = (scaling or {}).get("type") or (scaling or {}).get("rope_type")
    if not scaling or kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    raise FormatError(f"rotary_scaling type {kind!r} is not supported by the reference forward")
