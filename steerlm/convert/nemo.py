"""Import a NeMo Megatron GPT/Llama `.nemo` checkpoint (e.g. the published SteerLM chat and reward models)
into Hugging Face Llama format, so it can enter this package's pipeline.

A .nemo file is a tar holding `model_config.yaml`, the tokenizer and the weights in one of these layouts:
- `model_weights.ckpt` (torch.save state dict, tensor-parallel size 1), or
- `mp_rank_00/model_weights.ckpt`, `mp_rank_01/...` (one state dict per tensor-parallel rank), or
- `model_weights/` (Megatron distributed checkpoint, "torch_dist": global tensors, layers stacked).
Both Megatron-core names (`decoder.layers.N.self_attention.linear_qkv.weight`, ...) and legacy NeMo names
(`language_model.encoder.layers.N.self_attention.query_key_value.weight`, ...) are read.

Tensor-parallel merge rules (Megatron): vocab, qkv, fc1 and the output layer are column/vocab parallel
(concatenate along dim 0), linear_proj and fc2 row parallel (dim 1), norms replicated. Two traps:
the fused QKV is grouped per query group, [q heads of group g, k_g, v_g] for each g, so it is split by
group, not in thirds; and each rank's SwiGLU fc1 holds [gate_r; up_r], so gates and ups are gathered
separately. Vocabulary rows padded by Megatron are kept (config vocab_size = rows).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping

import click
import torch
import yaml

from steerlm.files import staged_dir
from steerlm.convert.stream import StreamingWriter

PRECISIONS = {"16": torch.float16, "16-mixed": torch.float16, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
              "32": torch.float32, "32-true": torch.float32}
_LEGACY = [
    (r"^language_model\.embedding\.word_embeddings\.weight$", "embedding.word_embeddings.weight"),
    (r"^language_model\.(?:encoder|decoder)\.final_layernorm\.weight$", "decoder.final_layernorm.weight"),
    (r"^language_model\.output_layer\.weight$", "output_layer.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.input_layernorm\.weight$",
     r"decoder.layers.\1.self_attention.linear_qkv.layer_norm_weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.post_attention_layernorm\.weight$",
     r"decoder.layers.\1.mlp.linear_fc1.layer_norm_weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.weight$",
     r"decoder.layers.\1.self_attention.linear_qkv.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.self_attention\.dense\.weight$",
     r"decoder.layers.\1.self_attention.linear_proj.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight$", r"decoder.layers.\1.mlp.linear_fc1.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h_2\.weight$",
     r"decoder.layers.\1.mlp.linear_fc1_up.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight$", r"decoder.layers.\1.mlp.linear_fc2.weight"),
]


class NemoError(ValueError):
    """The .nemo file is not a Llama-style NeMo Megatron GPT checkpoint this importer understands."""


def canonical_name(key: str) -> str | None:
    """Megatron-core name without the `model.` prefix, or None for non-weight entries (_extra_state, inv_freq)."""
    key = re.sub(r"^model\.(module\.)?", "", key)
    if "_extra_state" in key or key.endswith("inv_freq"):
        return None
    for pattern, repl in _LEGACY:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return key


def _load_pickled(path: Path, trust_pickle: bool) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=not trust_pickle)
    except Exception as exc:  # torch raises UnpicklingError subclasses and RuntimeErrors here
        if trust_pickle:
            raise
        raise NemoError(
            f"{path}: cannot be read as plain tensors ({type(exc).__name__}); if you trust this file, rerun with "
            "--trust_pickle to allow arbitrary pickled objects"
        ) from None
    sd = sd.get("state_dict", sd)
    out = {}
    for key, value in sd.items():
        name = canonical_name(key)
        if name is not None and isinstance(value, torch.Tensor):
            out[name] = value
    return out


def _load_dist(path: Path) -> dict:
    """Global tensors of a Megatron `torch_dist` checkpoint, with stacked layers split into per-layer views."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype)
          for k, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # single-process load is intended
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    out = {}
    for key, value in sd.items():
        name = canonical_name(key)
        if name is None:
            continue
        if name.startswith("decoder.layers.") and not name.split(".")[2].isdigit():
            rest = name[len("decoder.layers."):]
            for i, layer in enumerate(value.unbind(0)):
                out[f"decoder.layers.{i}.{rest}"] = layer
        else:
            out[name] = value
    return out


def load_rank_state_dicts(root: Path, trust_pickle: bool = False) -> list[dict]:
    """One canonical state dict per tensor-parallel rank (a distributed checkpoint counts as one merged rank)."""
    if (root / "model_weights.ckpt").is_file():
        return [_load_pickled(root / "model_weights.ckpt", trust_pickle)]
    ranks = sorted(root.glob("mp_rank_*/model_weights.ckpt"))
    if ranks:
        return [_load_pickled(p, trust_pickle) for p in ranks]
    if any(root.glob("tp_rank_*_pp_rank_*")):
        raise NemoError(f"{root}: pipeline-parallel .nemo checkpoints are not supported; merge PP to 1 with NeMo first")
    if (root / "model_weights" / ".metadata").is_file():
        return [_load_dist(root / "model_weights")]
    raise NemoError(f"{root}: no model_weights.ckpt, mp_rank_XX/model_weights.ckpt or model_weights/ found")


def hf_config(cfg: Mapping, vocab_rows: int, tied: bool, dtype: torch.dtype) -> dict:
    """Hugging Face LlamaConfig fields for a NeMo model_config.yaml."""
    if cfg.get("normalization", "rmsnorm") != "rmsnorm":
        raise NemoError(f"model_config.yaml normalization={cfg.get('normalization')!r}: only rmsnorm (Llama) is supported")
    if cfg.get("activation") not in ("swiglu", "fast-swiglu"):
        raise NemoError(f"model_config.yaml activation={cfg.get('activation')!r}: only swiglu (Llama) is supported")
    if cfg.get("bias", False):
        raise NemoError("model_config.yaml bias=true: Llama has no linear biases")
    if cfg.get("position_embedding_type", "rope") != "rope":
        raise NemoError(f"model_config.yaml position_embedding_type={cfg.get('position_embedding_type')!r}: need rope")
    if int(cfg.get("pipeline_model_parallel_size", 1)) != 1:
        raise NemoError("model_config.yaml pipeline_model_parallel_size > 1 is not supported")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    scaling = cfg.get("seq_len_interpolation_factor")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(cfg["ffn_hidden_size"]),
        "num_hidden_layers": int(cfg["num_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.get("num_query_groups") or heads),
        "head_dim": int(cfg.get("kv_channels") or hidden // heads),
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length") or 4096),
        "rms_norm_eps": float(cfg.get("layernorm_epsilon", 1e-5)),
        "rope_theta": float(cfg.get("rotary_base", 10000.0)),
        "rope_scaling": {"rope_type": "linear", "factor": float(scaling)} if scaling else None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "vocab_size": vocab_rows,
        "dtype": str(dtype).removeprefix("torch."),
    }


def hf_tensors(ranks: list[dict], config: Mapping, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, merged tensor) one at a time, in file order; `config` is what hf_config() returns."""

    def cat(name: str, dim: int) -> torch.Tensor:
        missing = [r for r, sd in enumerate(ranks) if name not in sd]
        if missing:
            raise NemoError(f"tensor {name!r} missing from tensor-parallel rank(s) {missing}")
        return torch.cat([sd[name] for sd in ranks], dim) if len(ranks) > 1 else ranks[0][name]

    heads, groups, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    per_group = heads // groups

    yield "model.embed_tokens.weight", cat("embedding.word_embeddings.weight", 0).to(dtype)
    for i in range(config["num_hidden_layers"]):
        p, hf = f"decoder.layers.{i}", f"model.layers.{i}"
        yield f"{hf}.input_layernorm.weight", ranks[0][f"{p}.self_attention.linear_qkv.layer_norm_weight"].to(dtype)
        qkv = cat(f"{p}.self_attention.linear_qkv.weight", 0).reshape(groups, per_group + 2, d, -1)
        yield f"{hf}.self_attn.q_proj.weight", qkv[:, :per_group].reshape(heads * d, -1).to(dtype)
        yield f"{hf}.self_attn.k_proj.weight", qkv[:, per_group].reshape(groups * d, -1).to(dtype)
        yield f"{hf}.self_attn.v_proj.weight", qkv[:, per_group + 1].reshape(groups * d, -1).to(dtype)
        del qkv
        yield f"{hf}.self_attn.o_proj.weight", cat(f"{p}.self_attention.linear_proj.weight", 1).to(dtype)
        yield f"{hf}.post_attention_layernorm.weight", ranks[0][f"{p}.mlp.linear_fc1.layer_norm_weight"].to(dtype)
        if f"{p}.mlp.linear_fc1_up.weight" in ranks[0]:  # legacy NeMo: separate gate (h_to_4h) and up (h_to_4h_2)
            gate, up = cat(f"{p}.mlp.linear_fc1.weight", 0), cat(f"{p}.mlp.linear_fc1_up.weight", 0)
        else:  # each rank holds [gate_r; up_r]
            halves = [sd[f"{p}.mlp.linear_fc1.weight"].chunk(2, 0) for sd in ranks]
            gate, up = torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
        yield f"{hf}.mlp.gate_proj.weight", gate.to(dtype)
        yield f"{hf}.mlp.up_proj.weight", up.to(dtype)
        del gate, up
        yield f"{hf}.mlp.down_proj.weight", cat(f"{p}.mlp.linear_fc2.weight", 1).to(dtype)
    yield "model.norm.weight", ranks[0]["decoder.final_layernorm.weight"].to(dtype)
    if "output_layer.weight" in ranks[0]:
        yield "lm_head.weight", cat("output_layer.weight", 0).to(dtype)


def _reward_head(ranks: list[dict]) -> dict[str, torch.Tensor] | None:
    """NeMo-Aligner reward models end in a small `rm_head` linear (one output per attribute)."""
    head = {k: v for k, v in ranks[0].items() if k.startswith("rm_head.")}
    weights = [v for k, v in head.items() if k.endswith("weight")]
    biases = [v for k, v in head.items() if k.endswith("bias")]
    if not weights:
        return None
    out = {"weight": weights[0].float().contiguous()}
    out["bias"] = biases[0].float().contiguous() if biases else torch.zeros(weights[0].shape[0])
    return out


def nemo_to_hf(
    nemo_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    schema: str = "helpsteer",
    trust_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face Llama checkpoint (config.json, model.safetensors, tokenizer, steerlm.json)."""
    from steerlm.spec import SteerSpec, save_spec

    nemo_path, output_dir = Path(nemo_path), Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise NemoError(f"--output_dir {output_dir} already exists (pass --overwrite to replace it)")
    with staged_dir(output_dir) as tmp, \
            tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=".nemo-extract-") as scratch:
        root = _extract(nemo_path, Path(scratch))
        cfg_path = next(iter(root.glob("model_config.yaml")), None)
        if cfg_path is None:
            raise NemoError(f"{nemo_path}: no model_config.yaml inside")
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg = cfg.get("model", cfg)
        torch_dtype = PRECISIONS.get(str(dtype or cfg.get("precision", "bf16")))
        if torch_dtype is None:
            raise NemoError(f"precision {dtype or cfg.get('precision')!r}: choose one of {', '.join(PRECISIONS)}")
        ranks = load_rank_state_dicts(root, trust_pickle)
        # The config first: it refuses unsupported models before any weight is merged.
        vocab_rows = sum(sd["embedding.word_embeddings.weight"].shape[0] for sd in ranks)
        config = hf_config(cfg, vocab_rows, "output_layer.weight" not in ranks[0], torch_dtype)
        _write_weights(tmp / "model.safetensors", lambda: hf_tensors(ranks, config, torch_dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        head = _reward_head(ranks)
        if head is not None:
            from safetensors.torch import save_file

            save_file(head, str(tmp / "reward_head.safetensors"))
        _copy_tokenizer(root, cfg, tmp)
        spec = SteerSpec.preset(schema)
        if head is not None:
            spec = SteerSpec(spec.schema, spec.template, kind="reward_model", extra={"pooling": "last"})
        save_spec(tmp, spec)
    return output_dir


def _extract(nemo_path: Path, scratch: Path) -> Path:
    if nemo_path.is_dir():
        return nemo_path
    if not tarfile.is_tarfile(nemo_path):
        raise NemoError(f"{nemo_path}: not a .nemo (tar) file or an extracted .nemo directory")
    with tarfile.open(nemo_path) as tar:
        tar.extractall(scratch, filter="data")
    return scratch


def _write_weights(path: Path, tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]) -> None:
    # Merging twice costs time, not memory: the first pass only records shapes to lay out the header.
    layout = [(name, tuple(t.shape), t.dtype) for name, t in tensors()]
    with StreamingWriter(path, layout, {"format": "pt"}) as writer:
        for name, t in tensors():
            writer.write(name, t.contiguous())


def _copy_tokenizer(root: Path, cfg: Mapping, out: Path) -> None:
    tok = cfg.get("tokenizer") or {}
    model = str(tok.get("model") or "").removeprefix("nemo:")
    src = root / model if model else None
    if src is not None and src.is_file():
        if src.name.endswith(".model"):
            shutil.copy2(src, out / "tokenizer.model")
        elif src.name.endswith(".json"):
            shutil.copy2(src, out / "tokenizer.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (root / name).is_file():
            shutil.copy2(root / name, out / name)
    if not (out / "tokenizer.json").is_file():
        click.echo(
            "note: no tokenizer.json in the .nemo; SteerLM serving needs one. With sentencepiece installed, make it "
            "with transformers: LlamaTokenizerFast(vocab_file='tokenizer.model').save_pretrained(OUTPUT_DIR)",
            err=True,
        )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nemo_file", required=True, type=click.Path(exists=True),
              help=".nemo file (tar) or a directory it was extracted to.")
@click.option("--output_dir", required=True, type=click.Path(), help="Hugging Face checkpoint directory to write.")
@click.option("--dtype", type=click.Choice(sorted(PRECISIONS)), default=None,
              help="Output precision; default: the model's own `precision` from model_config.yaml.")
@click.option("--schema", type=click.Choice(["helpsteer", "steerlm-13b"]), default="helpsteer", show_default=True,
              help="Attribute schema written to steerlm.json (steerlm-13b for the first Llama-2 13B SteerLM model).")
@click.option("--trust_pickle", is_flag=True, help="Allow arbitrary pickled objects in model_weights.ckpt.")
@click.option("--overwrite", is_flag=True, help="Replace --output_dir if it exists.")
def main(nemo_file, output_dir, dtype, schema, trust_pickle, overwrite) -> None:
    """Import a NeMo Megatron GPT/Llama .nemo checkpoint as a Hugging Face Llama checkpoint."""
    try:
        out = nemo_to_hf(nemo_file, output_dir, dtype=dtype, schema=schema, trust_pickle=trust_pickle,
                         overwrite=overwrite)
    except NemoError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote Hugging Face Llama checkpoint to {out}")
