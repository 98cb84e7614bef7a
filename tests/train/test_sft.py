"""`sft`: NeMo loss masking, packing without cross-attention, steering, exact resume, torchrun equivalence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import steer_train.sft as sft
from steer_train.data import Conversation
from steer_train.sample import generate
from steerlm.schema import HELPSTEER
from steerlm.spec import load_spec
from steerlm.template import DEFAULT_SYSTEM, Turn
from steerlm.tokenize import load_tokenizer
from tests.train.runs import losses, train_until_crash
from tests.train.traindata import steer_rows, write_conversations


def test_loss_mask_token_by_token(tiny_model):
    """Loss on answer text, its newline and the following <extra_id_1>; none on system, user or header."""
    tok = load_tokenizer(tiny_model)
    labels = [HELPSTEER.encode({"verbosity": 1}), "helpfulness:2"]
    conv = Conversation("x", (Turn("Hi <extra_id_1> there", "Hello!", labels[0]), Turn("More?", "Sure, more.", labels[1])))
    # The expected text, piece by piece from the SteerLM format (NVIDIA/NeMo-Aligner docs/user-guide/steerlm.rst),
    # with True where loss applies.
    pieces = [
        (f"<extra_id_0>System\n{DEFAULT_SYSTEM}\n", False),
        ("<extra_id_1>User\nHi <extra_id_1> there\n", False),
        (f"<extra_id_1>Assistant\n<extra_id_2>{labels[0]}\n", False),
        ("Hello!\n", True), ("<extra_id_1>", True), ("User\nMore?\n", False),
        (f"<extra_id_1>Assistant\n<extra_id_2>{labels[1]}\n", False),
        ("Sure, more.\n", True), ("<extra_id_1>", True),
    ]
    char_loss = [flag for text, flag in pieces for _ in text]
    text = "".join(t for t, _ in pieces)
    ids, token_labels = sft.loss_labels(tok, load_spec(tiny_model).template, conv)
    at = 0
    for tid, lab in zip(ids, token_labels):
        piece = tok.decode([tid], skip_special_tokens=False)
        assert text[at : at + len(piece)] == piece
        flags = set(char_loss[at : at + len(piece)])
        assert len(flags) == 1, f"token {piece!r} straddles a loss boundary"
        assert (lab == tid) if flags.pop() else (lab == sft.IGNORE), f"token {piece!r} at char {at}"
        at += len(piece)
    assert at == len(text)
    # The user's literal "<extra_id_1>" is ordinary text, not the control token.
    control = tok.token_to_id("<extra_id_1>")
    assert sum(1 for i in ids if i == control) == 5


def test_packed_samples_do_not_attend_to_each_other(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = load_tokenizer(tiny_model)
    template = load_spec(tiny_model).template
    samples = [sft.loss_labels(tok, template, Conversation(str(i), (Turn(f"q{i}", "a" * (i + 1), ""),))) for i in range(3)]
    blocks, truncated = sft.pack(samples, 400)
    assert truncated == 0 and len(blocks) == 1 and len(blocks[0]) == 3
    batch = sft.collate(blocks, 400, pad_id=3)
    with torch.no_grad():
        packed = sft.forward_logits(model, batch, model)[0]
        at = 0
        for ids, _ in blocks[0]:
            alone = model(torch.tensor([ids])).logits[0]
            assert torch.allclose(packed[at : at + len(ids)], alone, atol=1e-4)
            at += len(ids)


def test_sft_on_planted_attribute_steers_generation(steer_sft):
    prompts = [f"question {i}" for i in range(100, 110)]
    lengths = {}
    for v in (0, 4):
        answers = generate(steer_sft, prompts, {"verbosity": v}, max_new_tokens=40, temperature=0.7, seed=0, system="")
        lengths[v] = sum(len(a.split()) for a in answers) / len(answers)
    assert lengths[4] > lengths[0] + 5, lengths


def test_sft_output_is_a_servable_checkpoint(steer_sft):
    spec = load_spec(steer_sft)
    assert spec.kind == "generator" and spec.schema == HELPSTEER
    tok = load_tokenizer(steer_sft)
    gen = json.loads((steer_sft / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.token_to_id("<extra_id_1>")
    tok_cfg = json.loads((steer_sft / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == spec.template.chat_template()
    assert (steer_sft / "model.safetensors").is_file() and (steer_sft / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (steer_sft / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] / 4 and all(r["tokens_per_s"] > 0 for r in records if "loss" in r)


def small_config(tiny_model, tmp_path, name, **kw) -> sft.SFTConfig:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_conversations(data, steer_rows(24))
    base = dict(model=str(tiny_model), data=str(data), out=str(tmp_path / name), seq_len=192, micro_batch=1,
                grad_accum=2, lr=3e-3, max_steps=6, warmup=2, progress=False)
    return sft.SFTConfig(**(base | kw))


def test_resume_after_crash_matches_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    straight = sft.train(small_config(tiny_model, tmp_path, "straight", save_every=3))
    cfg = small_config(tiny_model, tmp_path, "resumed", save_every=3)
    train_until_crash(monkeypatch, sft.train, cfg, step=3)
    assert not (tmp_path / "resumed" / "steerlm.json").exists()
    resumed = sft.train(cfg)
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tiny_model, tmp_path):
    """Same global batch (1 process x 2 accumulation steps vs 2 processes x 1): the loss curves agree to 1e-5."""
    one = sft.train(small_config(tiny_model, tmp_path, "one", grad_accum=2))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "steer_train", "sft", "--model", str(tiny_model), "--data", str(tmp_path / "data.jsonl"),
           "--out", str(two), "--seq-len", "192", "--micro-batch", "1", "--grad-accum", "1", "--lr", "3e-3",
           "--max-steps", "6", "--warmup", "2", "--no-progress", "--device", "cpu"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world"] == 2
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)


def test_base_without_control_tokens_gets_them_added(tmp_path):
    """A plain HF causal LM (like SmolLM2) gains <extra_id_N> special tokens and a larger embedding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["hello world question answer"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    base = tmp_path / "base"
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>").save_pretrained(base)
    vocab = raw.get_vocab_size()
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(base)
    data = write_conversations(tmp_path / "d.jsonl", steer_rows(4))
    out = sft.train(sft.SFTConfig(model=str(base), data=str(data), out=str(tmp_path / "out"), seq_len=512, max_steps=1,
                                  progress=False))
    tok = load_tokenizer(out)
    ids = [tok.token_to_id(t) for t in ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")]
    assert None not in ids and min(ids) >= vocab
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab + 3
    assert tok.encode("<extra_id_1>", add_special_tokens=False).ids == [ids[1]]
    assert load_spec(out).schema == HELPSTEER


def test_too_little_data_for_the_global_batch_is_a_clear_error(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path, "x", micro_batch=64)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        sft.train(cfg)
