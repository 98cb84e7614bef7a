"""build/convert_checkpoint.py + build/verify_checkpoint.py: TensorRT-LLM checkpoints that reproduce the model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from steerlm.convert.legacy import convert
from steerlm.convert.trtllm_ckpt import FormatError
from steerlm.convert.verify import TOLERANCES, verify


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_fp16_checkpoint_verifies(gqa_model, tmp_path, tp):
    out = convert(gqa_model, tmp_path / "ckpt", tp, "float16", progress=False)
    report = verify(out, gqa_model)
    assert report.passed, report.summary()
    assert report.rel_err < TOLERANCES["float16"][0]
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]


def test_config_follows_the_trtllm_llama_schema(gqa_model, tmp_path):
    out = convert(gqa_model, tmp_path / "ckpt", 2, "bfloat16", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["dtype"] == "bfloat16"
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert cfg["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]) == (4, 2, 16)
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["rotary_base"] == 10000.0
    # The serving side reads the tokenizer and the SteerLM spec from the same directory.
    assert (out / "steerlm.json").is_file() and (out / "tokenizer.json").is_file()


def test_tp4_duplicates_kv_heads_and_pads_the_vocabulary(gqa_model, tmp_path):
    out = convert(gqa_model, tmp_path / "ckpt", 4, "float32", progress=False)
    hf = load_file(gqa_model / "model.safetensors")
    k = hf["model.layers.0.self_attn.k_proj.weight"]  # 2 KV heads of 16 rows each
    ranks = [load_file(out / f"rank{r}.safetensors") for r in range(4)]
    for r, rank in enumerate(ranks):
        qkv = rank["transformer.layers.0.attention.qkv.weight"]
        assert qkv.shape == (3 * 16, 64)  # one q, one k, one v head per rank
        assert torch.equal(qkv[16:32], k[(r // 2) * 16 : (r // 2 + 1) * 16])  # ranks 0,1 share KV head 0
    vocab = hf["lm_head.weight"].shape[0]
    head = torch.cat([rank["lm_head.weight"] for rank in ranks])
    assert head.shape[0] % 4 == 0 and head.shape[0] >= vocab
    assert torch.equal(head[:vocab], hf["lm_head.weight"]) and not head[vocab:].any()


def test_mlp_fc_is_gate_proj_and_mlp_gate_is_up_proj(gqa_model, tmp_path):
    out = convert(gqa_model, tmp_path / "ckpt", 1, "float32", progress=False)
    hf, rank = load_file(gqa_model / "model.safetensors"), load_file(out / "rank0.safetensors")
    assert torch.equal(rank["transformer.layers.1.mlp.fc.weight"], hf["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(rank["transformer.layers.1.mlp.gate.weight"], hf["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("dtype", ["float32", "fp8"])
def test_verifier_fails_when_fc_and_gate_are_swapped(gqa_model, fp8_stats, tmp_path, dtype):
    out = convert(gqa_model, tmp_path / "ckpt", 2, dtype, fp8_stats=fp8_stats, progress=False)
    assert verify(out, gqa_model).passed
    for r in range(2):
        path = out / f"rank{r}.safetensors"
        tensors = load_file(path)
        for i in range(2):
            for suffix in ("weight", "weights_scaling_factor"):
                a, b = f"transformer.layers.{i}.mlp.fc.{suffix}", f"transformer.layers.{i}.mlp.gate.{suffix}"
                if a in tensors:
                    tensors[a], tensors[b] = tensors[b], tensors[a]
        save_file(tensors, str(path))
    report = verify(out, gqa_model)
    assert not report.passed, report.summary()


def test_float32_checkpoint_is_exact_to_rounding(gqa_model, tmp_path):
    report = verify(convert(gqa_model, tmp_path / "ckpt", 4, "float32", progress=False), gqa_model)
    assert report.rel_err < 1e-5 and report.top1_agreement >= 0.99


@pytest.mark.parametrize("tp", [1, 4])
def test_fp8_checkpoint_stays_within_its_error_bound(gqa_model, fp8_stats, tmp_path, tp):
    out = convert(gqa_model, tmp_path / "ckpt", tp, "fp8", fp8_stats=fp8_stats, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"} and cfg["dtype"] == "float16"
    with safe_open(out / "rank0.safetensors", framework="pt") as f:
        assert f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype == torch.float8_e4m3fn
        for name in ("weights_scaling_factor", "activation_scaling_factor"):
            scale = f.get_tensor(f"transformer.layers.0.mlp.proj.{name}")
            assert scale.dtype == torch.float32 and scale.shape == (1,) and scale.item() > 0
        assert f.get_tensor("transformer.layers.0.attention.kv_cache_scaling_factor").shape == (1,)
        assert f.get_tensor("lm_head.weight").dtype == torch.float16
    report = verify(out, gqa_model)
    assert report.passed, report.summary()
    # FP8 costs accuracy, but fp16 is far more exact: the bound is about FP8, not a loose verifier.
    assert report.rel_err > verify(convert(gqa_model, tmp_path / "f16", tp, "float16", progress=False), gqa_model).rel_err


def test_fused_qkv_weight_scale_is_the_max_of_q_k_v(gqa_model, fp8_stats, tmp_path):
    out = convert(gqa_model, tmp_path / "ckpt", 1, "fp8", fp8_stats=fp8_stats, progress=False)
    hf = load_file(gqa_model / "model.safetensors")
    amax = max(hf[f"model.layers.0.self_attn.{p}_proj.weight"].abs().max() for p in "qkv")
    scale = load_file(out / "rank0.safetensors")["transformer.layers.0.attention.qkv.weights_scaling_factor"]
    assert torch.allclose(scale, (amax / 448).reshape(1))


def test_tied_embeddings_feed_lm_head(gqa_model, tmp_path):
    tied = tmp_path / "tied"
    shutil.copytree(gqa_model, tied)
    tensors = load_file(tied / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, str(tied / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    out = convert(tied, tmp_path / "ckpt", 2, "float32", progress=False)
    assert verify(out, tied).passed


def test_sharded_hf_checkpoint_converts_like_a_single_file(gqa_model, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(gqa_model, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = list(tensors)
    weight_map = {}
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-0000{part + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(sharded / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a = convert(gqa_model, tmp_path / "a", 2, "float16", progress=False)
    b = convert(sharded, tmp_path / "b", 2, "float16", progress=False)
    assert (a / "rank1.safetensors").read_bytes() == (b / "rank1.safetensors").read_bytes()


def test_interrupted_conversion_leaves_nothing_that_looks_like_a_checkpoint(gqa_model, tmp_path, interrupt_nth_write):
    interrupt_nth_write(7)
    with pytest.raises(KeyboardInterrupt):
        convert(gqa_model, tmp_path / "ckpt", 2, "float16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_without_the_flag(gqa_model, tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FormatError, match="already exists"):
        convert(gqa_model, tmp_path / "ckpt", 1, "float16", progress=False)


@pytest.mark.parametrize("tp, message", [(3, "num_attention_heads=4"), (8, "num_attention_heads=4")])
def test_tp_sizes_the_heads_cannot_split_are_refused(gqa_model, tmp_path, tp, message):
    with pytest.raises(FormatError, match=message):
        convert(gqa_model, tmp_path / "ckpt", tp, "float16", progress=False)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blockwise_fp8_quantization_equals_the_one_pass_formula_and_leaves_the_input(dtype, monkeypatch):
    from steerlm.convert import trtllm_ckpt

    monkeypatch.setattr(trtllm_ckpt, "QUANT_BLOCK", 100)  # many blocks
    w = (torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    for x in (w, w[:, 8:24], w[5]):  # whole, column shard, 1-D
        before = x.clone()
        scale = trtllm_ckpt.weight_scale(x) / 2  # some values clamp at +-448
        assert torch.equal(scale, (x.float().abs().amax().clamp(min=1e-12) / trtllm_ckpt.FP8_MAX).reshape(1) / 2)
        want = (x.float() / scale).clamp(-trtllm_ckpt.FP8_MAX, trtllm_ckpt.FP8_MAX).to(torch.float8_e4m3fn)
        got = trtllm_ckpt.quantize_fp8(x, scale)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(x, before)
