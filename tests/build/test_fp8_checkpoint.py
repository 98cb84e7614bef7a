"""steerlm.convert.hf_checkpoint: the ModelOpt-format FP8 Hugging Face checkpoint TensorRT-LLM and vLLM load.

What the loaders read (upstream files these tests pin):
- TensorRT-LLM PyTorch backend, NVIDIA/TensorRT-LLM tensorrt_llm/_torch/model_config.py
  `load_modelopt_quant_config`: hf_quant_config.json -> quantization.quant_algo, kv_cache_quant_algo,
  exclude_modules; tensorrt_llm/_torch/modules/linear.py `FP8QDQLinearMethod`: per module `weight`
  (float8_e4m3fn [out, in]), `weight_scale` and `input_scale` (one element, `.reshape([])`), fused q/k/v and
  gate/up take max(weight_scale) after requantizing each part and max(input_scale); `load_kv_scales` reads
  `k_scale` from the k_proj weights and `v_scale` from the v_proj weights.
- vLLM, vllm-project/vllm vllm/model_executor/layers/quantization/modelopt.py (commit 00155cdecca7):
  `ModelOptQuantConfigBase.from_config` reads {"quantization": {...}} (hf_quant_config.json) or the config.json
  form {"quant_method": "modelopt", "quant_algo", "kv_cache_scheme": {"type": "float", "num_bits": 8}, "ignore"};
  `ModelOptFp8LinearMethod` creates float8_e4m3fn `weight` and per-tensor `weight_scale`/`input_scale`, and
  requantizes fused shards to the max scale; vllm/model_executor/parameter.py `_is_1d_and_scalar` loads a
  0-dim checkpoint scale into a 1-element parameter; vllm/model_executor/model_loader/weight_utils.py
  `maybe_remap_kv_scale_name` maps ModelOpt's `.self_attn.k_proj.k_scale` / `.self_attn.v_proj.v_scale`.
- NVIDIA/Model-Optimizer modelopt/torch/export/convert_hf_config.py `convert_hf_quant_config_format`: the
  config.json `quantization_config` for FP8 (config_groups, ignore, quant_algo, kv_cache_scheme, quant_method).
"""

from __future__ import annotations

import json
from fnmatch import fnmatch

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from steerlm.convert.hf_checkpoint import LINEARS, loader_view, write_hf_checkpoint
from steerlm.convert.trtllm_ckpt import FP8_MAX, LlamaDims
from steerlm.convert.verify import TOLERANCES, verify


@pytest.fixture(scope="module")
def fp8_dir(gqa_model, fp8_stats, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8")
    write_hf_checkpoint(gqa_model, out, "bfloat16", fp8_stats, progress=False)
    return out


def tensors_of(path):
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_every_decoder_linear_is_fp8_with_scalar_float32_scales(fp8_dir, gqa_model):
    got, src = tensors_of(fp8_dir), load_file(gqa_model / "model.safetensors")
    dims = LlamaDims.from_model_dir(gqa_model)
    for i in range(dims.num_layers):
        for module in LINEARS:
            name = f"model.layers.{i}.{module}"
            assert got[f"{name}.weight"].dtype == torch.float8_e4m3fn
            assert got[f"{name}.weight"].shape == src[f"{name}.weight"].shape  # [out, in], unsplit
            for scale in ("weight_scale", "input_scale"):
                t = got[f"{name}.{scale}"]
                assert t.dtype == torch.float32 and t.shape == () and t.item() > 0, (name, scale)


def test_kv_cache_scales_sit_on_k_proj_and_v_proj(fp8_dir, gqa_model):
    got = tensors_of(fp8_dir)
    for i in range(LlamaDims.from_model_dir(gqa_model).num_layers):
        for name in (f"model.layers.{i}.self_attn.k_proj.k_scale", f"model.layers.{i}.self_attn.v_proj.v_scale"):
            assert got[name].dtype == torch.float32 and got[name].shape == () and got[name].item() >= 1.0
    assert not [n for n in got if n.endswith(".kv_scale")]  # the deprecated single name vLLM warns about


def test_unquantized_tensors_keep_the_base_dtype_and_only_known_names_exist(fp8_dir, gqa_model):
    got, src = tensors_of(fp8_dir), load_file(gqa_model / "model.safetensors")
    for name in src:
        if not any(f".{m}." in name for m in LINEARS):
            assert got[name].dtype == torch.bfloat16 and got[name].shape == src[name].shape, name
    suffixes = (".weight", ".weight_scale", ".input_scale", ".k_scale", ".v_scale")
    assert all(n.endswith(suffixes) for n in got)
    assert len(got) == len(src) + sum(2 for n in src if any(f".{m}." in n for m in LINEARS)) + 2 * 2


def test_weight_scale_is_amax_over_448_and_dequantizes_within_fp8_rounding(fp8_dir, gqa_model):
    got, src = tensors_of(fp8_dir), load_file(gqa_model / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    w = src[f"{name}.weight"].float()
    scale = got[f"{name}.weight_scale"]
    assert torch.allclose(scale, w.abs().amax() / FP8_MAX)
    deq = got[f"{name}.weight"].float() * scale
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal step near zero.
    assert ((deq - w).abs() <= w.abs() * 2**-4 + scale * 2**-9).all()


def test_input_scales_come_from_the_calibration_pass(fp8_dir, fp8_stats):
    got = tensors_of(fp8_dir)
    name = "model.layers.0.self_attn.o_proj"
    assert got[f"{name}.input_scale"].item() == pytest.approx(fp8_stats.act_amax[name] / FP8_MAX, rel=1e-6)


def test_hf_quant_config_reads_as_tensorrt_llm_reads_it(fp8_dir):
    quant = json.loads((fp8_dir / "hf_quant_config.json").read_text())["quantization"]
    assert (quant.get("quant_algo"), quant.get("kv_cache_quant_algo")) == ("FP8", "FP8")
    excluded = quant.get("exclude_modules")
    assert any(fnmatch("lm_head", pattern) for pattern in excluded)
    assert not any(fnmatch("model.layers.0.self_attn.q_proj", pattern) for pattern in excluded)


def test_config_json_quantization_config_reads_as_vllm_reads_it(fp8_dir):
    qc = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"].lower().startswith("modelopt") and "quantization" not in qc
    assert str(qc["quant_algo"]).upper() == "FP8"
    kv = qc["kv_cache_scheme"]
    assert isinstance(kv, dict) and kv["type"] == "float" and kv["num_bits"] == 8
    assert qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["weights"] == group["input_activations"] == {"dynamic": False, "num_bits": 8, "type": "float"}


def test_tokenizer_and_steerlm_spec_travel_unchanged(fp8_dir, gqa_model):
    for name in ("steerlm.json", "tokenizer.json"):
        assert (fp8_dir / name).read_bytes() == (gqa_model / name).read_bytes()


@pytest.mark.parametrize("tp", [1, 2])
def test_loader_view_fuses_qkv_per_rank_with_the_max_scale(fp8_dir, gqa_model, tp):
    config, ranks = loader_view(fp8_dir, tp)
    got = tensors_of(fp8_dir)
    dims = LlamaDims.from_model_dir(gqa_model)
    kv_local = max(dims.num_kv_heads // tp, 1)
    top = max(got[f"model.layers.0.self_attn.{p}_proj.weight_scale"].item() for p in "qkv")
    assert config["mapping"]["tp_size"] == tp and len(ranks) == tp
    for rank in ranks:
        qkv = rank["transformer.layers.0.attention.qkv.weight"]
        assert qkv.dtype == torch.float8_e4m3fn
        assert qkv.shape[0] == (dims.num_heads // tp + 2 * kv_local) * dims.head_size
        assert rank["transformer.layers.0.attention.qkv.weights_scaling_factor"].item() == pytest.approx(top, rel=1e-6)


@pytest.mark.parametrize("tp", [1, 2])
def test_reference_forward_of_the_fp8_checkpoint_matches_the_model(fp8_dir, gqa_model, tp):
    report = verify(fp8_dir, gqa_model, tp_size=tp)
    assert report.kind == "fp8" and report.passed, report.summary()
    assert report.rel_err <= TOLERANCES["fp8"][0]


@pytest.mark.parametrize("tensor, factor", [
    ("model.layers.1.mlp.down_proj.weight_scale", 8.0),
    ("model.layers.0.self_attn.q_proj.weight_scale", 8.0),
    ("model.layers.0.mlp.down_proj.input_scale", 1 / 64),
    ("model.layers.1.self_attn.v_proj.v_scale", 1000.0),
])
def test_a_corrupted_scale_fails_verification(fp8_dir, gqa_model, tmp_path, tensor, factor):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in fp8_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = tensors_of(bad)
    tensors[tensor] = tensors[tensor] * factor
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    report = verify(bad, gqa_model, tp_size=2)
    assert not report.passed, report.summary()


def test_bf16_checkpoint_has_no_quantization_files_and_verifies(gqa_model, tmp_path):
    write_hf_checkpoint(gqa_model, tmp_path, "bfloat16", progress=False)
    assert not (tmp_path / "hf_quant_config.json").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert verify(tmp_path, gqa_model, tp_size=2).passed


def test_tied_embeddings_stay_tied_and_verify(gqa_model, fp8_stats, tmp_path):
    tied = tmp_path / "tied"
    tied.mkdir()
    for f in gqa_model.iterdir():
        (tied / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tied / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, str(tied / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    out = tmp_path / "out"
    out.mkdir()
    write_hf_checkpoint(tied, out, "bfloat16", fp8_stats, progress=False)
    assert "lm_head.weight" not in tensors_of(out)
    assert verify(out, tied, tp_size=2).passed
