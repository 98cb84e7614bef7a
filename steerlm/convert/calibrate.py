"""FP8 calibration: activation ranges of every linear input and of the K/V cache over SteerLM prompts.

Two calibrators produce the same `Fp8Stats`:
- "builtin": forward hooks on the Hugging Face model (pure PyTorch; CPU or GPU). Runs anywhere.
- "modelopt": NVIDIA ModelOpt's FP8 max calibration (`nvidia-modelopt`, needs a CUDA GPU), the tool
  upstream uses to make FP8 checkpoints; its calibrated input amax values are taken per linear layer.
Calibration loads the model once; the conversion that follows still streams tensor by tensor.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from steerlm.convert.prompts import sample_token_ids
from steerlm.convert.trtllm_ckpt import Fp8Stats

CALIBRATORS = ("builtin", "modelopt")


class CalibratorUnavailable(RuntimeError):
    """The requested calibrator cannot run on this machine."""


def modelopt_problem() -> str | None:
    """Why ModelOpt calibration cannot run here, or None when it can."""
    if importlib.util.find_spec("modelopt") is None:
        return ("--calibrator modelopt needs NVIDIA ModelOpt: pip install nvidia-modelopt "
                "(on a CUDA machine); or use --calibrator builtin")
    if not torch.cuda.is_available():
        return "--calibrator modelopt needs a CUDA GPU; none is visible. Use --calibrator builtin"
    return None


def calibrate(model_dir: str | os.PathLike, calibrator: str = "builtin", max_len: int = 256) -> Fp8Stats:
    if calibrator not in CALIBRATORS:
        raise ValueError(f"calibrator {calibrator!r}: choose from {', '.join(CALIBRATORS)}")
    if calibrator == "modelopt" and (problem := modelopt_problem()):
        raise CalibratorUnavailable(problem)
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    prompts = [torch.tensor([ids], device=device) for ids in sample_token_ids(model_dir, "calibration", max_len)]

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for ids in prompts:
                m(input_ids=ids)

    act: dict[str, float] = {}
    kv: dict[int, float] = {}
    hooks = _install_hooks(model, act, kv)
    try:
        if calibrator == "modelopt":
            act = _modelopt_amax(model, forward_loop)
        else:
            forward_loop(model)
    finally:
        for h in hooks:
            h.remove()
    return Fp8Stats(act, kv)


def _install_hooks(model: torch.nn.Module, act: dict[str, float], kv: dict[int, float]) -> list:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hooks = []

    def on_linear(name: str) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0].detach()
            act[name] = max(act.get(name, 0.0), float(x.abs().amax()))
            if name.endswith(("self_attn.k_proj", "self_attn.v_proj")):
                layer = int(name.split(".")[2])
                y = output.detach().float()
                if name.endswith("k_proj"):
                    # The cache holds keys after RoPE, which rotates pairs (i, i + d/2): bound by the pair norm.
                    y = y.reshape(*y.shape[:-1], -1, 2, head_dim // 2).pow(2).sum(-2).sqrt()
                kv[layer] = max(kv.get(layer, 0.0), float(y.abs().amax()))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            hooks.append(module.register_forward_hook(on_linear(name)))
    return hooks


def _modelopt_amax(model: torch.nn.Module, forward_loop: Callable) -> dict[str, float]:
    import modelopt.torch.quantization as mtq

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    act = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "input_quantizer", None)
        if name.startswith("model.layers.") and quantizer is not None and getattr(quantizer, "amax", None) is not None:
            act[name] = float(quantizer.amax.float().max())
    return act
