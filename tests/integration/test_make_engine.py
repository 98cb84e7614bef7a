"""`make engine` on the `steer_train sft` output, on a machine without TensorRT-LLM (this CPU test setup).

Through make itself, as the docs promise: the default path writes a verified FP8 LLM API directory and prints
the plan and the serve command; FP8 on A100 is refused before anything is written; PLAN=1 on the Llama-2-70B
config prints the model card's answer; ENGINE=legacy stops after a verified TP checkpoint with exit status 3.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from steerlm.convert.engine import EXIT_BAD_REQUEST, EXIT_NO_TENSORRT_LLM

ROOT = Path(__file__).resolve().parents[2]
LLAMA_70B = ROOT / "tests" / "build" / "fixtures" / "llama-2-70b"
INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm"


def make_engine(*variables: str) -> subprocess.CompletedProcess:
    # -o: treat the setup stamp as up to date, so the test never reinstalls the virtualenv.
    return subprocess.run(["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", "engine", *variables],
                          capture_output=True, text=True)


def test_make_engine_fp8_tp2_h100_writes_a_verified_llmapi_directory(sft_model, tmp_path):
    out = tmp_path / "engine"
    proc = make_engine(f"MODEL={sft_model}", "TP=2", "DTYPE=fp8", "GPU=h100", f"OUT={out}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert proc.stdout.index("memory plan: 2 x H100") < proc.stdout.index("PASS [fp8]")
    assert f"make serve MODEL={out} BACKEND=trtllm TP=2" in proc.stdout
    assert (out / "hf_quant_config.json").is_file() and (out / "extra_llm_api_options.yaml").is_file()
    assert json.loads((out / "steerlm_engine.json").read_text())["format"] == "llmapi"
    # The serving side reads schema and template from the directory: they must arrive unchanged.
    assert (out / "steerlm.json").read_text() == (sft_model / "steerlm.json").read_text()


def test_make_engine_fp8_on_a100_is_refused_and_writes_nothing(sft_model, tmp_path):
    out = tmp_path / "engine"
    proc = make_engine(f"MODEL={sft_model}", "TP=2", "DTYPE=fp8", "GPU=a100-80", f"OUT={out}")
    assert proc.returncode != 0 and f"Error {EXIT_BAD_REQUEST}" in proc.stderr, proc.stdout + proc.stderr
    assert "DTYPE=fp8 is not possible on a100-80" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_make_engine_plan_on_the_70b_config_matches_the_model_card(tmp_path):
    """Llama2-70B-SteerLM-Chat: TP 2, 3,072 + 1,024 tokens, batch 1 -> 2 x 80 GB or 4 x 40 GB, not 2 x 40 GB."""
    for tp, gpu, fits in (("2", "h100", True), ("2", "a100-80", True), ("4", "a100-40", True), ("2", "a100-40", False)):
        proc = make_engine(f"MODEL={LLAMA_70B}", f"TP={tp}", "DTYPE=float16", f"GPU={gpu}", "PLAN=1", "MAX_BATCH=1",
                           f"OUT={tmp_path / 'out'}")
        assert proc.stdout.startswith(f"memory plan: {tp} x "), proc.stdout + proc.stderr
        assert ("verdict: fits" in proc.stdout) is fits and (proc.returncode == 0) is fits, proc.stderr
        if not fits:
            assert "the smallest TP that fits is TP=4" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_make_engine_legacy_float16_tp2_stops_with_exit_3_after_a_verified_checkpoint(sft_model, tmp_path):
    out = tmp_path / "engine"
    proc = make_engine(f"MODEL={sft_model}", "TP=2", "DTYPE=float16", "GPU=a100-80", "ENGINE=legacy", f"OUT={out}")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"Error {EXIT_NO_TENSORRT_LLM}" in proc.stderr, text
    assert "Traceback" not in text
    assert "PASS [float16]" in proc.stdout and INSTALL in proc.stdout
    assert f"trtllm-build --checkpoint_dir {out / 'checkpoint'}" in proc.stdout and "--kv_cache_type paged" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoint").glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]
    assert not (out / "engine").exists()
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["dtype"] == "float16" and config["mapping"]["tp_size"] == 2
