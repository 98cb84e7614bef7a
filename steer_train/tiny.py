"""A tiny random SteerLM-ready checkpoint: a byte-level BPE tokenizer with the control tokens and a small Llama.

It is what tests and first runs serve and convert; nonsense answers are expected until it is trained.
"""

from __future__ import annotations

from pathlib import Path

from steerlm.spec import SteerSpec, save_spec
from steerlm.template import DEFAULT_SYSTEM, PromptTemplate

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# Enough English for the BPE merges to be word-like; any text is encodable byte-level anyway.
_CORPUS = [
    DEFAULT_SYSTEM,
    "Techno is a genre of electronic dance music that originated in Detroit, Michigan, in the 1980s.",
    "The quick brown fox jumps over the lazy dog. Where and when did it happen? Why does it matter?",
    "Write a short poem about the sea. Explain how a neural network learns from data, step by step.",
    "Answer the question as helpfully, correctly and coherently as you can, with the requested detail.",
    "Ünïcödé text, emoji 🎵 and numbers 0123456789 must round-trip through the tokenizer unchanged.",
]


def train_tokenizer(template: PromptTemplate, vocab_size: int = 1024, corpus: list[str] | None = None):
    """Byte-level BPE whose control strings (`<extra_id_N>`) are each one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + list(template.control_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=list(template.control_tokens),
    )


def init_tiny(
    out: str | Path,
    spec: SteerSpec | None = None,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 1024,
    max_positions: int = 1024,
    seed: int = 0,
    corpus: list[str] | None = None,
) -> Path:
    """Write the checkpoint to `out`; `corpus` (default: a few built-in sentences) trains the tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = spec or SteerSpec()
    out = Path(out)
    tokenizer = train_tokenizer(spec.template, vocab_size, corpus)
    stop_id = tokenizer.convert_tokens_to_ids(spec.template.stop_strings[0])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    save_spec(out, spec)
    return out
