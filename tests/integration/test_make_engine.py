"""`make engine` on the `steer_train sft` output, on a machine without TensorRT-LLM (this CPU test setup).

Through make itself, as the docs promise: float16 and FP8-on-H100 stop after a verified checkpoint with the
install message and the converter's distinct exit status 3 (make reports it as `Error 3`); FP8 on A100 is
refused before anything is written.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from steerlm.convert.engine import EXIT_BAD_REQUEST, EXIT_NO_TENSORRT_LLM

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm"


def make_engine(*variables: str) -> subprocess.CompletedProcess:
    # -o: treat the setup stamp as up to date, so the test never reinstalls the virtualenv.
    return subprocess.run(["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", "engine", *variables],
                          capture_output=True, text=True)


def assert_stopped_after_verified_checkpoint(proc: subprocess.CompletedProcess, out: Path, dtype: str) -> dict:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"Error {EXIT_NO_TENSORRT_LLM}" in proc.stderr, text
    assert "Traceback" not in text
    assert f"PASS [{dtype}]" in proc.stdout and INSTALL in proc.stdout
    assert f"trtllm-build --checkpoint_dir {out / 'checkpoint'}" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoint").glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]
    assert not (out / "engine").exists()
    return json.loads((out / "checkpoint" / "config.json").read_text())


def test_make_engine_float16_tp2_stops_with_exit_3_after_a_verified_checkpoint(sft_model, tmp_path):
    out = tmp_path / "engine"
    proc = make_engine(f"MODEL={sft_model}", "TP=2", "DTYPE=float16", f"OUT={out}")
    config = assert_stopped_after_verified_checkpoint(proc, out, "float16")
    assert config["dtype"] == "float16" and config["mapping"]["tp_size"] == 2


def test_make_engine_fp8_on_h100_stops_with_exit_3_after_a_verified_fp8_checkpoint(sft_model, tmp_path):
    out = tmp_path / "engine"
    proc = make_engine(f"MODEL={sft_model}", "TP=2", "DTYPE=fp8", "GPU=h100", f"OUT={out}")
    config = assert_stopped_after_verified_checkpoint(proc, out, "fp8")
    assert config["quantization"]["quant_algo"] == "FP8"
    assert "--gemm_plugin disable" in proc.stdout


def test_make_engine_fp8_on_a100_is_refused_and_writes_nothing(sft_model, tmp_path):
    out = tmp_path / "engine"
    proc = make_engine(f"MODEL={sft_model}", "TP=2", "DTYPE=fp8", "GPU=a100", f"OUT={out}")
    assert proc.returncode != 0 and f"Error {EXIT_BAD_REQUEST}" in proc.stderr, proc.stdout + proc.stderr
    assert "DTYPE=fp8 is not possible on A100" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
