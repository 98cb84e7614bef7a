"""`steer_train sft` output -> build/convert_checkpoint.py at TP 2 float16 -> build/verify_checkpoint.py passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def script(name: str, *args) -> subprocess.CompletedProcess:
    """Run build/NAME with the project's interpreter from the repository root, as a user would."""
    return subprocess.run([sys.executable, str(ROOT / "build" / name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_sft_output_converts_to_a_tp2_float16_checkpoint_that_verifies(sft_model, tmp_path):
    out = tmp_path / "trtllm"
    convert = script("convert_checkpoint.py", "--model_dir", sft_model, "--output_dir", out, "--tp_size", 2,
                     "--dtype", "float16")
    assert convert.returncode == 0, convert.stdout + convert.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16" and config["mapping"]["tp_size"] == 2
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    # The serving side reads schema and template from the checkpoint: they must arrive unchanged.
    assert (out / "steerlm.json").read_text() == (sft_model / "steerlm.json").read_text()

    verify = script("verify_checkpoint.py", "--checkpoint_dir", out, "--model_dir", sft_model)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "PASS [float16]" in verify.stdout
