"""Local batched sampling from a SteerLM checkpoint (bootstrap and local evaluation use it).

Prompts are tokenized by `steerlm.tokenize` exactly as the server does; generation stops at the
template's stop strings (`<extra_id_1>`), which are never part of the returned text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from steerlm.spec import SteerSpec, load_spec
from steerlm.tokenize import encode_prompt, load_tokenizer


@dataclass
class LocalModel:
    """A checkpoint loaded for sampling in this process."""

    model: torch.nn.Module
    tokenizer: object  # tokenizers.Tokenizer
    spec: SteerSpec
    device: str = "cpu"


def load_local_model(model_dir: str | os.PathLike, device: str = "cpu") -> LocalModel:
    from transformers import AutoModelForCausalLM

    spec = load_spec(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return LocalModel(model, load_tokenizer(model_dir), spec, device)


def generate(
    model: str | os.PathLike | LocalModel,
    prompts: Sequence[str],
    attributes: Mapping[str, int] | Sequence[Mapping[str, int] | None] | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    seed: int = 0,
    *,
    top_p: float = 1.0,
    system: str | None | Sequence[str | None] = None,
    histories: Sequence[Sequence[Mapping]] | None = None,
    batch_size: int = 8,
) -> list[str]:
    """One answer per prompt. `attributes` is one mapping for all prompts or one per prompt (omitted
    attributes take the schema defaults); `histories` gives earlier turns per prompt as
    {question, answer, optional labels/attributes}; `system` is one system prompt or one per prompt
    (None: the template's default). temperature 0 means greedy."""
    gen = model if isinstance(model, LocalModel) else load_local_model(model)
    n = len(prompts)
    per_prompt = list(attributes) if isinstance(attributes, (list, tuple)) else [attributes] * n
    histories = list(histories) if histories is not None else [()] * n
    systems = list(system) if isinstance(system, (list, tuple)) else [system] * n
    if not len(per_prompt) == len(histories) == len(systems) == n:
        raise ValueError(f"{n} prompts need as many attribute sets, histories and system prompts")
    template = gen.spec.template
    stop_ids = [i for i in (gen.tokenizer.token_to_id(s) for s in template.stop_strings) if i is not None]
    pad_id = gen.tokenizer.token_to_id("<pad>")
    pad_id = pad_id if pad_id is not None else stop_ids[0]
    encoded = [
        encode_prompt(gen.tokenizer, template, gen.spec.prompt_turns(q, a, h), s)
        for q, a, h, s in zip(prompts, per_prompt, histories, systems)
    ]
    torch.manual_seed(seed)
    outputs: list[str] = []
    for start in range(0, n, batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        # Left padding keeps every prompt's last token at the same position for generation.
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = gen.model.generate(
                input_ids=input_ids.to(gen.device),
                attention_mask=mask.to(gen.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=pad_id,
                **sampling,
            )
        for row in out[:, width:].tolist():
            outputs.append(_finish(gen.tokenizer.decode(row, skip_special_tokens=False), template))
    return outputs


def _finish(text: str, template) -> str:
    """Cut at the first stop string (padding after it goes too) and drop the answer's closing newline,
    which belongs to the template."""
    for stop in template.stop_strings:
        text = text.split(stop, 1)[0]
    return text[: -len(template.answer_end)] if template.answer_end and text.endswith(template.answer_end) else text
