"""steerlm.convert.engine (`make engine`, build/build_engine.py): plan first, then the LLM API directory or the
legacy engine; refusals before anything is written; nothing valid-looking left by a failed or interrupted run."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from steerlm.convert import engine, hf_checkpoint
from steerlm.convert.engine import EXIT_BAD_REQUEST, EXIT_NO_TENSORRT_LLM, EXIT_VERIFY_FAILED, LegacyBuild
from steerlm.convert.llmapi import cuda_graph_batch_sizes, llm_api_options
from steerlm.convert.plan import plan
from steerlm.convert.trtllm_ckpt import FormatError, LlamaDims, check_tp

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
LLMAPI_FILES = ["config.json", "extra_llm_api_options.yaml", "generation_config.json", "hf_quant_config.json",
                "model.safetensors", "steerlm.json", "steerlm_engine.json", "tokenizer.json", "tokenizer_config.json"]


def run(args, monkeypatch=None, trtllm=False):
    if monkeypatch is not None:
        monkeypatch.setattr(engine, "tensorrt_llm_available", lambda: trtllm)
    return CliRunner().invoke(engine.main, [str(a) for a in args])


def test_fp8_tp2_h100_writes_a_verified_llmapi_directory(gqa_model, tmp_path):
    out = tmp_path / "out"
    result = run(["--model_dir", gqa_model, "--tp_size", 2, "--dtype", "fp8", "--gpu", "h100", "--output_dir", out])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.index("memory plan: 2 x H100") < text.index("[calibrate]") < text.index("[convert]")
    assert "PASS [fp8]" in text
    assert f"make serve MODEL={out} BACKEND=trtllm TP=2" in text
    assert sorted(p.name for p in out.iterdir()) == LLMAPI_FILES
    record = json.loads((out / "steerlm_engine.json").read_text())
    assert record["format"] == "llmapi" and record["tp_size"] == 2 and record["dtype"] == "fp8"
    assert record["gpu"] == "h100" and record["tensorrt_llm"] == ">=1.0" and record["plan"]["fits"]
    options = yaml.safe_load((out / "extra_llm_api_options.yaml").read_text())
    assert options["tensor_parallel_size"] == 2 and options["kv_cache_config"]["dtype"] == "fp8"
    assert options["max_seq_len"] == record["plan"]["max_seq_len"]


def test_bfloat16_directory_has_no_quantization_config(gqa_model, tmp_path):
    out = tmp_path / "out"
    result = run(["--model_dir", gqa_model, "--tp_size", 1, "--dtype", "bfloat16", "--gpu", "a100-40",
                  "--output_dir", out])
    assert result.exit_code == 0, result.output
    assert "PASS [bfloat16]" in result.output and not (out / "hf_quant_config.json").exists()
    options = yaml.safe_load((out / "extra_llm_api_options.yaml").read_text())
    assert options["kv_cache_config"] == {"free_gpu_memory_fraction": 0.85, "enable_block_reuse": True,
                                          "dtype": "auto"}


def test_options_file_holds_only_llm_api_keyword_names():
    """Names as TensorRT-LLM's tensorrt_llm/llmapi/llm_args.py declares them (BaseLlmArgs, KvCacheConfig,
    CudaGraphConfig; those config models forbid unknown fields)."""
    p = plan(json.loads((FIXTURES / "llama-2-70b" / "config.json").read_text()), 2, "float16", "h100", 8, 4096, 8192)
    options = llm_api_options(p)
    assert set(options) == {"tensor_parallel_size", "max_batch_size", "max_num_tokens", "max_seq_len",
                            "kv_cache_config", "cuda_graph_config"}
    assert set(options["kv_cache_config"]) == {"free_gpu_memory_fraction", "enable_block_reuse", "dtype"}
    assert options["cuda_graph_config"] == {"batch_sizes": [1, 2, 4, 8]}
    assert (options["max_batch_size"], options["max_num_tokens"], options["max_seq_len"]) == (8, 8192, 4096)


def test_cuda_graph_batch_sizes_cover_the_max_batch():
    assert cuda_graph_batch_sizes(1) == [1]
    assert cuda_graph_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


def test_default_batch_is_the_gpu_default_capped_by_the_plan():
    config = json.loads((FIXTURES / "llama-2-70b" / "config.json").read_text())
    capped = engine.make_plan(config, 2, "float16", "h100", None, 4096, 8192)
    assert capped.max_batch_size == capped.largest_batch < 64 and capped.fits
    small = engine.make_plan(config, 8, "fp8", "h200", None, 4096, 8192)
    assert small.max_batch_size == 128


def test_plan_only_prints_the_plan_and_writes_nothing(tmp_path):
    result = run(["--model_dir", FIXTURES / "llama-2-70b", "--tp_size", 2, "--dtype", "float16", "--gpu", "h100",
                  "--max_batch_size", 1, "--plan_only", "--output_dir", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    assert "weights                64.24 GiB  (68,977,967,104 bytes)" in result.output
    assert "verdict: fits" in result.output and not (tmp_path / "out").exists()


def test_plan_that_cannot_fit_is_refused_before_any_weight_is_read(tmp_path):
    result = run(["--model_dir", FIXTURES / "llama-2-70b", "--tp_size", 2, "--dtype", "float16",
                  "--gpu", "a100-40", "--max_batch_size", 1, "--output_dir", tmp_path / "out"])
    assert result.exit_code == EXIT_BAD_REQUEST
    assert "does NOT fit" in result.output and "the smallest TP that fits is TP=4" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gpu", ["a100-40", "a100-80"])
def test_fp8_on_a100_is_refused_before_anything_is_written(gqa_model, tmp_path, gpu):
    result = run(["--model_dir", gqa_model, "--tp_size", 2, "--dtype", "fp8", "--gpu", gpu,
                  "--output_dir", tmp_path / "out"])
    assert result.exit_code == EXIT_BAD_REQUEST
    assert "not possible on" in result.output and "SM80" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is not None, reason="nvidia-modelopt is installed here")
def test_modelopt_calibrator_without_modelopt_is_refused_with_the_install_line(gqa_model, tmp_path):
    result = run(["--model_dir", gqa_model, "--tp_size", 2, "--dtype", "fp8", "--calibrator", "modelopt",
                  "--output_dir", tmp_path / "out"])
    assert result.exit_code == EXIT_BAD_REQUEST
    assert "pip install nvidia-modelopt" in result.output and not (tmp_path / "out").exists()


def test_tp_the_heads_cannot_split_is_refused(tmp_path, gqa_model):
    result = run(["--model_dir", gqa_model, "--tp_size", 3, "--output_dir", tmp_path / "out"])
    assert result.exit_code == EXIT_BAD_REQUEST and "--tp_size 3" in result.output


def test_kv_head_count_decides_the_allowed_tp_sizes():
    dims = LlamaDims.from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 768, "num_hidden_layers": 1,
                                     "num_attention_heads": 12, "num_key_value_heads": 3,
                                     "intermediate_size": 1536, "vocab_size": 100})
    for tp in (1, 3, 6, 12):
        check_tp(dims, tp)
    with pytest.raises(FormatError, match="num_key_value_heads=3 .* allowed TP sizes for this model: 1, 3, 6, 12"):
        check_tp(dims, 2)


def test_interrupted_conversion_leaves_nothing_that_looks_valid(gqa_model, tmp_path, interrupt_nth_write):
    interrupt_nth_write(9)
    result = run(["--model_dir", gqa_model, "--tp_size", 2, "--dtype", "fp8", "--output_dir", tmp_path / "out"])
    assert isinstance(result.exception, KeyboardInterrupt) or result.exit_code != 0
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(gqa_model, tmp_path, monkeypatch):
    # A checkpoint writer that drops the FP8 scales' meaning: every weight scale doubled.
    real = hf_checkpoint.hf_tensors

    def corrupt(*args, **kwargs):
        for name, t in real(*args, **kwargs):
            yield name, (t * 8 if name.endswith("weight_scale") and t.device.type != "meta" else t)

    monkeypatch.setattr(hf_checkpoint, "hf_tensors", corrupt)
    result = run(["--model_dir", gqa_model, "--tp_size", 2, "--dtype", "fp8", "--output_dir", tmp_path / "out"])
    assert result.exit_code == EXIT_VERIFY_FAILED, result.output
    assert "FAIL [fp8]" in result.output and list(tmp_path.iterdir()) == []


# --- legacy engine path (TensorRT-LLM <= 1.2.x) ---------------------------------------------------------


def test_legacy_fp8_on_h100_gives_a_verified_checkpoint_and_the_install_message(gqa_model, tmp_path, monkeypatch):
    result = run(["--model_dir", gqa_model, "--tp_size", 2, "--dtype", "fp8", "--gpu", "h100", "--engine", "legacy",
                  "--output_dir", tmp_path / "out"], monkeypatch)
    assert result.exit_code == EXIT_NO_TENSORRT_LLM, result.output
    assert "PASS [fp8]" in result.output and "--gemm_plugin disable" in result.output
    assert "tensorrt_llm<1.3" in result.output
    cfg = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "FP8"
    assert not (tmp_path / "out" / "steerlm_engine.json").exists()  # no engine, nothing to serve


def test_legacy_build_records_the_tensorrt_llm_version_it_needs(gqa_model, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "trtllm-build"
    fake.parent.mkdir()
    # Stands in for trtllm-build: writes an engine directory where --output_dir says.
    fake.write_text("#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = --output_dir ] && mkdir -p \"$2\" && "
                    "echo '{}' > \"$2/config.json\"; shift; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(engine, "tensorrt_llm_version", lambda: "1.2.1")
    result = run(["--model_dir", gqa_model, "--tp_size", 2, "--dtype", "float16", "--gpu", "a100-80",
                  "--engine", "legacy", "--output_dir", tmp_path / "out"], monkeypatch, trtllm=True)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "steerlm_engine.json").read_text())
    assert record["format"] == "legacy-engine" and record["tensorrt_llm"] == "==1.2.1" and record["tp_size"] == 2
    assert (tmp_path / "out" / "engine" / "steerlm.json").is_file()


def test_failed_trtllm_build_leaves_no_engine_and_no_record(gqa_model, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "trtllm-build"
    fake.parent.mkdir()
    # A trtllm-build that dies half way: it has started the engine directory.
    fake.write_text("#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = --output_dir ] && mkdir -p \"$2\"; shift; done\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    out.mkdir()
    (out / "steerlm_engine.json").write_text('{"format": "legacy-engine"}')  # from an earlier run
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    result = run(["--model_dir", gqa_model, "--tp_size", 1, "--dtype", "float16", "--gpu", "a100-80",
                  "--engine", "legacy", "--output_dir", out], monkeypatch, trtllm=True)
    assert result.exit_code == EXIT_VERIFY_FAILED, result.output
    assert not (out / "engine").exists() and not (out / "steerlm_engine.json").exists()


def test_make_engine_legacy_without_tensorrt_llm_stops_with_a_clear_message(gqa_model, tmp_path):
    """The real CLI on a machine without TensorRT-LLM (this one): exit 3, no traceback, next steps printed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build" / "build_engine.py"), "--model_dir", str(gqa_model), "--tp_size", "2",
         "--dtype", "float16", "--gpu", "a100-80", "--engine", "legacy", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_NO_TENSORRT_LLM, text
    assert "Traceback" not in text and "ImportError" not in text
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm" in text
    assert "PASS [float16]" in text
    assert f"trtllm-build --checkpoint_dir {tmp_path / 'out' / 'checkpoint'}" in text
    assert f"make serve MODEL={tmp_path / 'out'} BACKEND=trtllm TP=2" in text
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint").glob("rank*")) == ["rank0.safetensors",
                                                                                        "rank1.safetensors"]


@pytest.mark.parametrize("dtype, gemm", [("float16", "auto"), ("bfloat16", "auto"), ("fp8", "disable")])
def test_trtllm_build_flags_per_dtype(dtype, gemm):
    args = LegacyBuild(dtype, 2, 64, 3072, 4096, 8192).trtllm_build_args(Path("ck"), Path("eng"))
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags["--gemm_plugin"] == gemm
    # --paged_kv_cache is deprecated in favour of --kv_cache_type paged.
    assert flags["--kv_cache_type"] == "paged" and "--paged_kv_cache" not in flags
    assert flags["--use_paged_context_fmha"] == "enable"
    assert (flags["--max_input_len"], flags["--max_seq_len"], flags["--workers"]) == ("3072", "4096", "2")
