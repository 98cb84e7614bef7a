"""build/build_engine.py (`make engine`): request checks, per-GPU trtllm-build flags, and the stop without TensorRT-LLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import build_engine
import pytest
from build_engine import EXIT_BAD_REQUEST, EXIT_NO_TENSORRT_LLM, BuildPlan
from click.testing import CliRunner
from trtllm_ckpt import FormatError, LlamaDims, check_tp

ROOT = Path(__file__).resolve().parents[2]


def run(args, monkeypatch, trtllm=False):
    monkeypatch.setattr(build_engine, "tensorrt_llm_available", lambda: trtllm)
    return CliRunner().invoke(build_engine.main, [str(a) for a in args])


def test_fp8_on_a100_is_refused_before_anything_is_written(gqa_model, tmp_path, monkeypatch):
    result = run(["--model_dir", gqa_model, "--tp_size", 2, "--dtype", "fp8", "--gpu", "a100",
                  "--output_dir", tmp_path / "out"], monkeypatch)
    assert result.exit_code == EXIT_BAD_REQUEST
    assert "not possible on A100" in result.output and "SM80" in result.output
    assert not (tmp_path / "out").exists()


def test_fp8_on_h100_gives_a_verified_checkpoint_and_the_install_message(gqa_model, tmp_path, monkeypatch):
    result = run(["--model_dir", gqa_model, "--tp_size", 2, "--dtype", "fp8", "--gpu", "h100",
                  "--output_dir", tmp_path / "out"], monkeypatch)
    assert result.exit_code == EXIT_NO_TENSORRT_LLM, result.output
    assert "PASS [fp8]" in result.output
    assert "--gemm_plugin disable" in result.output
    cfg = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "FP8"


def test_make_engine_without_tensorrt_llm_stops_with_a_clear_message(gqa_model, tmp_path):
    """The real CLI on a machine without TensorRT-LLM (this one): exit 3, no traceback, next steps printed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build" / "build_engine.py"), "--model_dir", str(gqa_model), "--tp_size", "2",
         "--dtype", "float16", "--gpu", "a100", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_NO_TENSORRT_LLM, text
    assert "Traceback" not in text and "ImportError" not in text
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm" in text
    assert "PASS [float16]" in text
    assert f"trtllm-build --checkpoint_dir {tmp_path / 'out' / 'checkpoint'}" in text
    assert f"ENGINE_DIR={tmp_path / 'out' / 'engine'} TP=2" in text
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint").glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]


def test_tp_the_kv_heads_cannot_serve_is_refused(tmp_path, monkeypatch, gqa_model):
    result = run(["--model_dir", gqa_model, "--tp_size", 3, "--output_dir", tmp_path / "out"], monkeypatch)
    assert result.exit_code == EXIT_BAD_REQUEST and "--tp_size 3" in result.output


def test_kv_head_count_decides_the_allowed_tp_sizes():
    dims = LlamaDims.from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 768, "num_hidden_layers": 1,
                                     "num_attention_heads": 12, "num_key_value_heads": 3,
                                     "intermediate_size": 1536, "vocab_size": 100})
    for tp in (1, 3, 6, 12):
        check_tp(dims, tp)
    with pytest.raises(FormatError, match="num_key_value_heads=3 .* allowed TP sizes for this model: 1, 3, 6, 12"):
        check_tp(dims, 2)


@pytest.mark.parametrize("dtype, gemm", [("float16", "auto"), ("bfloat16", "auto"), ("fp8", "disable")])
def test_trtllm_build_flags_per_dtype(dtype, gemm):
    args = BuildPlan(dtype, 2).trtllm_build_args(Path("ck"), Path("eng"))
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags["--gemm_plugin"] == gemm
    assert flags["--use_paged_context_fmha"] == "enable" and flags["--paged_kv_cache"] == "enable"
    assert (flags["--max_input_len"], flags["--max_seq_len"], flags["--workers"]) == ("3072", "4096", "2")
