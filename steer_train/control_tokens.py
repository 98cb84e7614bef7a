"""Adding the SteerLM control tokens (`<extra_id_0..2>`) to a base that lacks them, with usable embeddings.

`resize_token_embeddings` gives every new row the same mean vector, so the control tokens are
indistinguishable to any method that keeps the embeddings frozen (LoRA, training only some layers): such a
model can never learn to emit the turn end `<extra_id_1>`, because its logit always ties with the other two.
Here each new token gets its own row, in the input embedding and in an untied output head alike:

- the row of the base's own chat-template special token of the same role where the base has one (the
  turn end from `<|im_end|>`/`<|eot_id|>`..., the turn/system openers from `<|im_start|>`/...), so a chat
  base's learned "end the answer here" transfers to `<extra_id_1>` at once;
- otherwise the mean row;
plus small seeded noise (scaled to the rows' spread). The noise matters for copies too: an exact copy in a
frozen output head ties the new token's logit with its source forever, and greedy decoding then emits the
source (`<|im_end|>`, lower id) instead of the stop string the server waits for.

`import-gguf`, `init-base` and the `sft`/`rm` loops all add tokens through `add_control_tokens`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from steerlm.spec import SteerSpec
from steerlm.template import PromptTemplate

# Chat special tokens of common bases, by the role they play. A turn end is what the model emits when an
# answer is complete; an opener starts a header. Order is preference.
TURN_END_SOURCES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
OPENER_SOURCES = ("<|im_start|>", "<|start_header_id|>", "<start_of_turn>", "<|user|>", "<|assistant|>",
                  "<|system|>", "<|end_header_id|>", "<s>", "<|begin_of_text|>")
# Noise relative to the per-dimension spread of the existing rows: small enough to stay near the mean,
# large enough that the rows differ by far more than float rounding.
NOISE_SCALE = 0.1


@dataclass(frozen=True)
class AddedRow:
    token: str
    token_id: int
    source: str | None  # the base token the row was copied from; None: mean plus noise


def _wanted_sources(template: PromptTemplate, token: str) -> tuple[str, ...]:
    return TURN_END_SOURCES if token in template.stop_strings or token == template.turn_end else OPENER_SOURCES


def add_control_tokens(model: torch.nn.Module, hf_tokenizer, template: PromptTemplate, seed: int = 0) -> list[AddedRow]:
    """Add the template's control tokens the tokenizer lacks as special tokens, resize the model's
    embeddings and give each new row its own starting vector (module doc). Returns what was added."""
    from tokenizers import AddedToken

    vocab = hf_tokenizer.get_vocab()
    missing = [t for t in template.control_tokens if t not in vocab]
    if not missing:
        return []
    old_rows = model.get_input_embeddings().weight.shape[0]
    hf_tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    model.resize_token_embeddings(len(hf_tokenizer))
    used: set[str] = set()
    plan: list[AddedRow] = []
    for token in missing:
        source = next((s for s in _wanted_sources(template, token)
                       if s in vocab and s not in used and vocab[s] < old_rows), None)
        if source is not None:
            used.add(source)
        plan.append(AddedRow(token, hf_tokenizer.convert_tokens_to_ids(token), source))
    generator = torch.Generator().manual_seed(seed)
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
        tables.append(out.weight)
    with torch.no_grad():
        for table in tables:
            base = table[:old_rows].float()
            mean, spread = base.mean(0), base.std(0)
            for row in plan:
                start = base[vocab[row.source]] if row.source is not None else mean
                noise = torch.randn(base.shape[1], generator=generator) * spread * NOISE_SCALE
                table[row.token_id] = (start + noise).to(table.dtype)
    return plan


def describe(rows: list[AddedRow]) -> str:
    parts = [f"{r.token} from {r.source}" if r.source else f"{r.token} from mean+noise" for r in rows]
    return "added control tokens " + ", ".join(parts)


def save_as_base(model: torch.nn.Module, hf_tokenizer, spec: SteerSpec, out: Path) -> Path:
    """Add the control tokens and write a SteerLM base (`sft`/`rm`/serving read it): what `import-gguf` and
    `init-base` both end with."""
    from steer_train.models import save_generator

    rows = add_control_tokens(model, hf_tokenizer, spec.template)
    if rows:
        print(describe(rows))
    return save_generator(out, model, hf_tokenizer, spec)


def init_base(model_dir: str | os.PathLike, out: str | os.PathLike, preset: str = "helpsteer") -> Path:
    """Any Hugging Face causal LM directory -> a SteerLM base with control tokens, template and steerlm.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(model_dir) / "steerlm.json").is_file():
        raise ValueError(f"{model_dir} already is a SteerLM checkpoint (steerlm.json); train from it directly")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return save_as_base(model, tokenizer, SteerSpec.preset(preset), Path(out))
