"""Writes synthetic .nemo files from a Hugging Face Llama, laid out as NeMo Megatron saves them.

Written independently of build/nemo_to_hf.py from Megatron's sharding rules, so the import is checked
against the layout, not against itself: per tensor-parallel rank, the fused QKV holds whole query groups
[q heads of the group, k, v]; SwiGLU fc1 holds [gate_r; up_r]; row-parallel weights split on dim 1;
the vocabulary is padded and split on dim 0.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

VOCAB_DIVISOR = 16


def _megatron_global(sd: dict, cfg: dict, tp: int) -> tuple[dict, int]:
    """Per-layer global tensors in Megatron's fused layouts (+ padded vocab size)."""
    h, heads, groups = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    padded = -(-vocab // (VOCAB_DIVISOR * tp)) * VOCAB_DIVISOR * tp
    pad = lambda w: torch.nn.functional.pad(w, (0, 0, 0, padded - vocab))  # noqa: E731
    out = {"embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        out["output_layer.weight"] = pad(sd["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        q = sd[f"{p}.self_attn.q_proj.weight"].reshape(groups, heads // groups, d, h)
        k = sd[f"{p}.self_attn.k_proj.weight"].reshape(groups, 1, d, h)
        v = sd[f"{p}.self_attn.v_proj.weight"].reshape(groups, 1, d, h)
        out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, h)
        out[f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight"] = sd[f"{p}.input_layernorm.weight"]
        out[f"decoder.layers.{i}.self_attention.linear_proj.weight"] = sd[f"{p}.self_attn.o_proj.weight"]
        out[f"decoder.layers.{i}.mlp.gate"] = sd[f"{p}.mlp.gate_proj.weight"]
        out[f"decoder.layers.{i}.mlp.up"] = sd[f"{p}.mlp.up_proj.weight"]
        out[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = sd[f"{p}.mlp.down_proj.weight"]
        out[f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"] = sd[f"{p}.post_attention_layernorm.weight"]
    return out, padded


def _rank(g: dict, r: int, tp: int, legacy: bool) -> dict:
    sd = {}
    for name, w in g.items():
        if name.endswith(("layer_norm_weight", "final_layernorm.weight")):
            part = w
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            part = w.chunk(tp, 1)[r]
        else:
            part = w.chunk(tp, 0)[r]
        sd[name] = part.clone()
    for name in [n for n in sd if n.endswith(".mlp.gate")]:
        base = name[: -len(".gate")]
        gate, up = sd.pop(name), sd.pop(f"{base}.up")
        if legacy:
            sd[f"{base}.dense_h_to_4h.weight"], sd[f"{base}.dense_h_to_4h_2.weight"] = gate, up
        else:
            sd[f"{base}.linear_fc1.weight"] = torch.cat([gate, up])
    if legacy:
        sd = {_legacy_name(k): v for k, v in sd.items()}
    else:
        sd = {f"model.{k}": v for k, v in sd.items()}
        sd["model.decoder.layers.0.self_attention.core_attention._extra_state"] = torch.empty(0)
    return sd


def _legacy_name(k: str) -> str:
    table = {
        "embedding.word_embeddings.weight": "model.language_model.embedding.word_embeddings.weight",
        "decoder.final_layernorm.weight": "model.language_model.encoder.final_layernorm.weight",
        "output_layer.weight": "model.language_model.output_layer.weight",
    }
    if k in table:
        return table[k]
    k = k.replace("decoder.layers.", "model.language_model.encoder.layers.")
    for a, b in [(".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
                 (".mlp.linear_fc1.layer_norm_weight", ".post_attention_layernorm.weight"),
                 (".self_attention.linear_qkv.weight", ".self_attention.query_key_value.weight"),
                 (".self_attention.linear_proj.weight", ".self_attention.dense.weight"),
                 (".mlp.linear_fc2.weight", ".mlp.dense_4h_to_h.weight")]:
        k = k.replace(a, b)
    return k


def model_config(cfg: dict, tp: int, tied: bool) -> dict:
    return {
        "mcore_gpt": True, "precision": "32", "num_layers": cfg["num_hidden_layers"],
        "hidden_size": cfg["hidden_size"], "ffn_hidden_size": cfg["intermediate_size"],
        "num_attention_heads": cfg["num_attention_heads"], "num_query_groups": cfg["num_key_value_heads"],
        "kv_channels": None, "max_position_embeddings": cfg["max_position_embeddings"],
        "encoder_seq_length": cfg["max_position_embeddings"], "layernorm_epsilon": cfg["rms_norm_eps"],
        "normalization": "rmsnorm", "activation": "fast-swiglu", "bias": False, "position_embedding_type": "rope",
        "rotary_base": 10000.0, "share_embeddings_and_output_weights": tied, "make_vocab_size_divisible_by": VOCAB_DIVISOR,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1,
        "tokenizer": {"library": "huggingface", "model": "nemo:0a1b_tokenizer.json"},
    }


def write_nemo(hf_dir: Path, out: Path, tp: int = 1, *, legacy: bool = False, dist: bool = False,
               tied: bool = False) -> Path:
    """A .nemo tar of the HF model at `hf_dir`: mp_rank_XX/ shards (tp>1), model_weights.ckpt, or model_weights/."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "model.safetensors")
    if tied:
        sd.pop("lm_head.weight")
    g, _ = _megatron_global(sd, cfg, 1 if dist else tp)
    staging = out.parent / (out.name + ".staging")
    staging.mkdir(parents=True)
    (staging / "model_config.yaml").write_text(yaml.safe_dump(model_config(cfg, 1 if dist else tp, tied)))
    (staging / "0a1b_tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    if dist:
        import torch.distributed.checkpoint as dcp

        full = _rank(g, 0, 1, legacy=False)
        stacked: dict = {}
        for k, v in full.items():
            if k.startswith("model.decoder.layers.") and "_extra_state" not in k:
                parts = k.split(".")
                stacked.setdefault(".".join(parts[:3] + parts[4:]), []).append(v)
            elif "_extra_state" not in k:
                stacked[k] = v
        sd_dist = {k: torch.stack(v) if isinstance(v, list) else v for k, v in stacked.items()}
        dcp.save(sd_dist, checkpoint_id=str(staging / "model_weights"), no_dist=True)
    elif tp == 1:
        torch.save(_rank(g, 0, 1, legacy), staging / "model_weights.ckpt")
    else:
        for r in range(tp):
            (staging / f"mp_rank_{r:02d}").mkdir()
            torch.save(_rank(g, r, tp, legacy), staging / f"mp_rank_{r:02d}" / "model_weights.ckpt")
    with tarfile.open(out, "w") as tar:
        for path in sorted(staging.rglob("*")):
            tar.add(path, arcname="./" + str(path.relative_to(staging)), recursive=False)
    return out

