"""The model in and out of training: the base checkpoint's spec, the final Hugging Face
checkpoint the server serves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from steerlm.spec import SteerSpec, load_spec, save_spec


def base_spec(model_dir: str | os.PathLike, preset: str | None) -> SteerSpec:
    """The base checkpoint's steerlm.json, or a preset schema with the default template for a plain HF model."""
    if (Path(model_dir) / "steerlm.json").is_file():
        spec = load_spec(model_dir)
        if preset and SteerSpec.preset(preset).schema != spec.schema:
            raise ValueError(f"--schema {preset} differs from the schema in {model_dir}/steerlm.json")
        return spec
    return SteerSpec.preset(preset or "helpsteer")


def save_generator(out: Path, model, hf_tokenizer, spec: SteerSpec) -> Path:
    """A Hugging Face checkpoint the server serves and build/ converts: safetensors weights, tokenizer with the
    chat template, generation config stopping at the turn end, and steerlm.json written last."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    stop_id = hf_tokenizer.convert_tokens_to_ids(spec.template.stop_strings[0])
    pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else stop_id
    model.config.eos_token_id = stop_id
    model.config.pad_token_id = pad_id
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=stop_id, pad_token_id=pad_id
    )
    model.save_pretrained(tmp, safe_serialization=True)
    # The base's own chat template (e.g. ChatML) must not outlive the switch to the SteerLM template.
    hf_tokenizer.chat_template = spec.template.chat_template()
    hf_tokenizer.save_pretrained(tmp)
    save_spec(tmp, SteerSpec(spec.schema, spec.template, "generator", spec.extra))
    (out / "steerlm.json").unlink(missing_ok=True)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != "steerlm.json"] + ["steerlm.json"]:
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    return out
