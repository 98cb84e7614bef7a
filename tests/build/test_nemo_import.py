"""build/nemo_to_hf.py (steerlm.convert.nemo): NeMo Megatron .nemo checkpoints import as the Hugging Face Llama they encode."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .nemo_files import VOCAB_DIVISOR, write_nemo
from steerlm.convert.nemo import NemoError, nemo_to_hf


def assert_same_weights(original, imported):
    want, got = load_file(original / "model.safetensors"), load_file(imported / "model.safetensors")
    vocab = want["model.embed_tokens.weight"].shape[0]
    for name, tensor in want.items():
        if name not in got:
            assert name == "lm_head.weight" and json.loads((imported / "config.json").read_text())["tie_word_embeddings"]
            continue
        g = got[name]
        if g.shape[0] != tensor.shape[0]:  # Megatron's vocabulary padding rows are kept, zero
            assert g.shape[0] % VOCAB_DIVISOR == 0 and not g[vocab:].any()
            g = g[:vocab]
        assert torch.equal(g, tensor), name


@pytest.mark.parametrize("tp", [1, 2])
def test_mcore_nemo_with_tensor_parallel_shards_round_trips(gqa_model, tmp_path, tp):
    nemo = write_nemo(gqa_model, tmp_path / "m.nemo", tp=tp)
    out = nemo_to_hf(nemo, tmp_path / "hf")
    assert_same_weights(gqa_model, out)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)


def test_legacy_nemo_names_with_separate_swiglu_halves_round_trip(gqa_model, tmp_path):
    out = nemo_to_hf(write_nemo(gqa_model, tmp_path / "m.nemo", tp=2, legacy=True), tmp_path / "hf")
    assert_same_weights(gqa_model, out)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_layout_round_trips(gqa_model, tmp_path):
    out = nemo_to_hf(write_nemo(gqa_model, tmp_path / "m.nemo", dist=True), tmp_path / "hf")
    assert_same_weights(gqa_model, out)


def test_imported_model_gives_the_same_logits_and_carries_tokenizer_and_spec(gqa_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from steerlm.spec import load_spec

    out = nemo_to_hf(write_nemo(gqa_model, tmp_path / "m.nemo", tp=2, tied=True), tmp_path / "hf")
    assert (out / "tokenizer.json").read_bytes() == (gqa_model / "tokenizer.json").read_bytes()
    assert load_spec(out).schema.names[0] == "quality"
    ids = torch.tensor([[1, 7, 42, 300, 5]])
    tied_src = AutoModelForCausalLM.from_pretrained(gqa_model, dtype=torch.float32)
    tied_src.lm_head.weight = tied_src.model.embed_tokens.weight  # the .nemo was written with shared embeddings
    imported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = tied_src(input_ids=ids).logits[0]
    got = imported(input_ids=ids).logits[0, :, : want.shape[-1]]
    assert torch.allclose(got, want, atol=1e-5)


def test_not_a_nemo_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "x.nemo"
    bogus.write_text("hello")
    with pytest.raises(NemoError, match="not a .nemo"):
        nemo_to_hf(bogus, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("engine_kind, exit_code", [("llmapi", 0), ("legacy", 3)])
def test_imported_nemo_feeds_both_make_engine_paths(gqa_model, tmp_path, monkeypatch, engine_kind, exit_code):
    from click.testing import CliRunner

    from steerlm.convert import engine

    monkeypatch.setattr(engine, "tensorrt_llm_available", lambda: False)
    hf = nemo_to_hf(write_nemo(gqa_model, tmp_path / "m.nemo", tp=2), tmp_path / "hf", dtype="32")
    out = tmp_path / "out"
    result = CliRunner().invoke(engine.main, ["--model_dir", str(hf), "--tp_size", "2", "--dtype", "fp8",
                                              "--gpu", "h100", "--engine", engine_kind, "--output_dir", str(out)])
    assert result.exit_code == exit_code, result.output
    assert "PASS [fp8]" in result.output
    assert (out / ("steerlm_engine.json" if engine_kind == "llmapi" else "checkpoint/config.json")).is_file()
