"""steerlm.convert.plan: memory plans of the seed deployments, against numbers worked out by hand.

Hand rules (issue 11): weights = params x bytes (matrices split over TP, norms replicated); KV cache per
token = 2 x layers x KV heads per GPU x head_dim x bytes. Llama-2 configs: tests/build/fixtures.
The Llama2-70B SteerLM card deploys TP 2 with 3,072 input + 1,024 output tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerlm.convert.plan import GIB, GPUS, RUNTIME_RESERVE, plan, refusal, smallest_fitting_tp
from steerlm.convert.trtllm_ckpt import FormatError

FIXTURES = Path(__file__).parent / "fixtures"
SEQ = 3072 + 1024
TOKENS = 8192
# Llama-2-70B: hidden 8192, 80 layers, 64 heads, 8 KV heads (head_dim 128), intermediate 28672, vocab 32000.
L70_LINEAR = 80 * (8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672)
L70_EMBED = 2 * 32000 * 8192  # embed_tokens + lm_head
L70_NORMS = (2 * 80 + 1) * 8192
# Llama-2-13B: hidden 5120, 40 layers, 40 heads = 40 KV heads, intermediate 13824, vocab 32000.
L13_LINEAR = 40 * (4 * 5120 * 5120 + 3 * 5120 * 13824)
L13_EMBED = 2 * 32000 * 5120
L13_NORMS = (2 * 40 + 1) * 5120


def config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def plan70(tp, dtype="float16", gpu="h100", batch=1):
    return plan(config("llama-2-70b"), tp, dtype, gpu, batch, SEQ, TOKENS)


def plan13(tp, dtype="float16", gpu="a100-80", batch=1):
    return plan(config("llama-2-13b"), tp, dtype, gpu, batch, SEQ, TOKENS)


def test_parameter_counts_are_the_published_ones():
    assert L70_LINEAR + L70_EMBED + L70_NORMS == 68_976_648_192
    assert L13_LINEAR + L13_EMBED + L13_NORMS == 13_015_864_320


def test_70b_tp2_fp16_per_gpu_weights_and_kv():
    p = plan70(2)
    assert p.weight_bytes == (L70_LINEAR + L70_EMBED) * 2 // 2 + L70_NORMS * 2 == 68_977_967_104
    assert p.kv_bytes_per_token == 2 * 80 * (8 // 2) * 128 * 2 == 163_840
    assert p.kv_bytes == 163_840 * 1 * SEQ


def test_allowance_is_the_runtime_reserve_plus_one_step_of_activations_and_logits():
    p = plan70(2)
    per_token = 2 * 8192 + (64 // 2 + 2 * 8 // 2) * 128 + 2 * 28672 // 2
    assert p.allowance_bytes == RUNTIME_RESERVE + TOKENS * per_token * 2 + 1 * 32000 * 4


@pytest.mark.parametrize("tp, gpu, fits", [(2, "h100", True), (2, "a100-80", True), (4, "a100-40", True),
                                           (2, "a100-40", False), (1, "h100", False)])
def test_70b_card_deployment_fits_2x80_and_4x40_but_not_2x40(tp, gpu, fits):
    assert plan70(tp, gpu=gpu).fits is fits


def test_a_plan_that_does_not_fit_names_its_numbers_and_the_smallest_tp():
    p = plan70(2, gpu="a100-40")
    message = refusal(p, config("llama-2-70b"))
    assert "TP=2 on a100-40 does not fit" in message
    assert f"{p.weight_bytes / GIB:.2f} GiB" in message and "40.00 GiB per GPU" in message
    assert "the smallest TP that fits is TP=4" in message


def test_largest_batch_is_the_boundary_of_fitting():
    largest = plan70(2).largest_batch
    assert largest >= 1
    assert plan70(2, batch=largest).fits and not plan70(2, batch=largest + 1).fits


@pytest.mark.parametrize("tp, weights, kv_per_token", [
    (1, (L13_LINEAR + L13_EMBED) * 2 + L13_NORMS * 2, 2 * 40 * 40 * 128 * 2),
    (4, (L13_LINEAR + L13_EMBED) * 2 // 4 + L13_NORMS * 2, 2 * 40 * 10 * 128 * 2),
])
def test_13b_tp1_and_tp4_fp16(tp, weights, kv_per_token):
    p = plan13(tp)
    assert (p.weight_bytes, p.kv_bytes_per_token) == (weights, kv_per_token)
    assert p.fits and plan13(tp, gpu="a100-40").fits


def test_fp8_on_h100_halves_linear_weights_and_the_kv_cache():
    p = plan70(2, "fp8")
    assert p.weight_bytes == (L70_LINEAR * 1 + L70_EMBED * 2) // 2 + L70_NORMS * 2 == 34_752_446_464
    assert p.kv_bytes_per_token == 2 * 80 * 4 * 128 * 1
    q = plan13(1, "fp8", gpu="h100")
    assert q.weight_bytes == L13_LINEAR + L13_EMBED * 2 + L13_NORMS * 2
    assert q.kv_bytes_per_token == 2 * 40 * 40 * 128
    assert plan13(4, "fp8", gpu="h100").weight_bytes == (L13_LINEAR + L13_EMBED * 2) // 4 + L13_NORMS * 2
    assert p.fits and p.largest_batch > plan70(2).largest_batch


def test_smallest_fitting_tp_of_70b_fp16_on_h100_is_2():
    assert smallest_fitting_tp(config("llama-2-70b"), "float16", "h100", 1, SEQ, TOKENS) == 2


@pytest.mark.parametrize("model, tp, message", [
    ("llama-2-70b", 3, "num_attention_heads=64 is not divisible"),
    ("llama-2-13b", 3, "num_attention_heads=40 is not divisible"),
    ("llama-2-70b", 6, "num_attention_heads=64 is not divisible"),
])
def test_head_counts_must_divide_by_tp(model, tp, message):
    with pytest.raises(FormatError, match=message):
        plan(config(model), tp, "float16", "h100", 1, SEQ, TOKENS)


def test_unknown_gpu_and_dtype_are_refused_with_the_choices():
    with pytest.raises(FormatError, match="GPU='a100': choose one of " + ", ".join(GPUS)):
        plan70(2, gpu="a100")
    with pytest.raises(FormatError, match="DTYPE='int8': choose one of bfloat16, float16, fp8"):
        plan70(2, dtype="int8")
