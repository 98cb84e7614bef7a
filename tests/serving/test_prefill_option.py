"""`--max-prefill-tokens`: how many padded prompt tokens one prefill of the torch engine may hold."""

from __future__ import annotations

import json

from steerlm.generation import PREFILL_TOKENS
from steerlm.serve.engines import create_engine
from tests.serving.test_llmapi_serve import _parameters, serve_cli


def test_the_option_reaches_the_generators_engine_options(tmp_path, tiny_model):
    out = serve_cli("--model", tiny_model, "--max-prefill-tokens", 512, "--repo-dir", tmp_path / "repo", "--dry-run")
    assert out.returncode == 0, out.stderr
    options = _parameters((tmp_path / "repo" / "generator" / "config.pbtxt").read_text())["engine_options"]
    assert json.loads(options.encode().decode("unicode_escape")) == {"device": "cpu", "max_prefill_tokens": 512}


def test_the_torch_engine_takes_the_budget_and_defaults_to_the_documented_value(tiny_model):
    engine = create_engine("torch", tiny_model, max_batch_size=2, max_prefill_tokens=512)
    default = create_engine("torch", tiny_model, max_batch_size=2)
    try:
        assert engine.max_prefill_tokens == 512 and default.max_prefill_tokens == PREFILL_TOKENS
    finally:
        engine.close()
        default.close()
    out = serve_cli("--help")
    assert f"[default: {PREFILL_TOKENS}," in " ".join(out.stdout.split())


def test_a_budget_under_one_token_or_for_trtllm_is_refused(tiny_model):
    zero = serve_cli("--model", tiny_model, "--max-prefill-tokens", 0, "--dry-run")
    assert zero.returncode == 2 and "--max-prefill-tokens" in zero.stderr
    trtllm = serve_cli("--model", tiny_model, "--backend", "trtllm", "--max-prefill-tokens", 64, "--dry-run")
    assert trtllm.returncode == 2 and "belongs to the cpu and torch backends" in trtllm.stderr
