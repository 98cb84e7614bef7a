"""GPU figures (never run by `make test` or `make bench`): decode speed against the memory-bandwidth limit, SFT
tokens/s and MFU, FP8 GEMM numerics against bf16. Exits with a message when there is no CUDA device.

- Decode: the torch generator (steerlm.generation.Engine on cuda, bf16) on a ~1B-parameter random Llama
  (hidden 2048, 28 layers, 32 heads / 8 KV heads), batch 1, 8, 32. Each decode step must read every weight once,
  so tokens/s <= batch x bandwidth / weight bytes; bandwidth is measured here (a large device-to-device copy)
  and reported next to the datasheet figure when the device is known.
- SFT: `python -m steer_train sft --device cuda --bf16` on the same shape, packed blocks of --seq-len;
  MFU = 6 x parameters x tokens/s / datasheet dense bf16 FLOP/s (attention FLOPs left out, so a lower bound).
- FP8: torch._scaled_mm with per-tensor scales (amax / 448, e4m3) on Llama-shaped GEMMs against the bf16
  matmul of the same operands: relative error and speed (SM89+).

    .venv/bin/python -m bench.gpu [--quick]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from bench.common import command_line, fmt, machine, out_option, record, repeat, summarize, table

ROOT = Path(__file__).resolve().parents[1]

# Datasheet figures: HBM bandwidth (bytes/s) and dense bf16 tensor FLOP/s, by a substring of the device name.
DATASHEET = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),
    "A100-SXM4-80GB": (2.039e12, 312e12),
    "A100 80GB PCIe": (1.935e12, 312e12),
    "A100": (1.555e12, 312e12),
    "L40S": (0.864e12, 362e12),
}
SHAPE_1B = dict(hidden_size=2048, layers=28, heads=32, kv_heads=8)


def datasheet(name: str) -> tuple[float, float] | None:
    for key, figs in DATASHEET.items():
        if key in name:
            return figs
    return None


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Achievable HBM bandwidth: bytes read + written by a device-to-device copy, per second (best of repeats)."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def decode_tokens_per_s(engine, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> float:
    """Generated tokens/s with `batch` requests decoding together (prefill is one row at a time and excluded:
    the clock starts when the last request has produced its first token)."""
    import torch

    from steerlm.generation import GenerationRequest, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, vocab, (batch, prompt_len), generator=g).tolist()
    lock, finished = threading.Lock(), threading.Event()
    state = {"first": 0, "tokens": 0, "done": 0, "t_start": None, "t_end": None}

    def make_emit():
        seen = [False]

        def emit(tokens: list[int], final: bool) -> None:
            with lock:
                if tokens and not seen[0]:
                    seen[0] = True
                    state["first"] += 1
                    if state["first"] == batch:
                        state["t_start"] = time.perf_counter()
                elif tokens and state["t_start"] is not None:
                    state["tokens"] += len(tokens)
                if final:
                    state["done"] += 1
                    if state["done"] == batch:
                        state["t_end"] = time.perf_counter()
                        finished.set()
        return emit

    for ids in prompts:
        engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=new_tokens), make_emit(), stream=True))
    if not finished.wait(1800):
        raise TimeoutError("decode run did not finish")
    return state["tokens"] / (state["t_end"] - state["t_start"])


def sft_tokens_per_s(model_dir: Path, data: Path, out: Path, seq_len: int, steps: int) -> float:
    cmd = [sys.executable, "-m", "steer_train", "sft", "--model", str(model_dir), "--data", str(data), "--out", str(out),
           "--seq-len", str(seq_len), "--max-steps", str(steps), "--warmup", "2", "--device", "cuda", "--bf16",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"steer_train sft failed:\n{proc.stderr[-4000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    return statistics.median(tps[2:] or tps)  # the first steps pay for allocation and kernel selection


def count_params(model_dir: Path) -> tuple[int, int]:
    """Parameters and vocabulary size of the checkpoint, from a meta-device instance (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()), config.vocab_size


def fp8_gemm(m: int, k: int, n: int) -> tuple[float, float]:
    """(relative Frobenius error of the FP8 GEMM against bf16, bf16 time / FP8 time) for x[m,k] @ w[n,k]^T."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    fmax = torch.finfo(torch.float8_e4m3fn).max

    def quant(t):
        scale = (t.abs().amax().float() / fmax).clamp(min=1e-12)
        return (t.float() / scale).to(torch.float8_e4m3fn), scale

    xq, sx = quant(x)
    wq, sw = quant(w)
    ref = x @ w.t()
    out = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())

    def timed(fn, reps=50):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    speed = timed(lambda: x @ w.t()) / timed(
        lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16))
    return err, speed


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="4 layers instead of 28, fewer tokens and steps, one repeat.")
@click.option("--repeats", type=int, default=None, help="Repeats (default 3, 1 with --quick).")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="SFT block length.")
@out_option
def main(quick, repeats, seq_len, out) -> None:
    """Decode tokens/s vs the bandwidth limit, SFT tokens/s and MFU, FP8 GEMM numerics (needs CUDA)."""
    import torch

    if not torch.cuda.is_available():
        raise click.ClickException(f"bench/gpu.py needs a CUDA GPU; torch {torch.__version__} sees none. "
                                   "The CPU benchmarks are `make bench`.")
    from steer_train.demo_data import build_demo_data
    from steer_train.tiny import init_tiny
    from steerlm.generation import Engine

    repeats = repeats or (1 if quick else 3)
    name = torch.cuda.get_device_name(0)
    sheet = datasheet(name)
    click.echo(f"device: {name}", err=True)
    shape = dict(SHAPE_1B, layers=4) if quick else SHAPE_1B
    new_tokens = 32 if quick else 128
    metrics, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        model_dir = init_tiny(Path(tmp) / "model", **shape, max_positions=4096)
        data = build_demo_data(Path(tmp) / "data")["train"]
        bw = copy_bandwidth()
        params, vocab = count_params(model_dir)
        weight_bytes = 2 * params  # bf16
        engine = Engine(model_dir, max_batch_size=32, device="cuda", dtype=torch.bfloat16)
        try:
            decode_tokens_per_s(engine, 2, 16, 4, vocab)  # warm-up

            def one(r: int) -> dict[str, float]:
                return {f"b{b}": decode_tokens_per_s(engine, b, 128, new_tokens, vocab) for b in (1, 8, 32)}

            raw = repeat(one, repeats)
        finally:
            engine.close()
        for b in (1, 8, 32):
            limit = b * bw / weight_bytes
            metrics[f"decode_b{b}_vs_bandwidth_limit"] = summarize([v / limit for v in raw[f"b{b}"]])
            rows.append([f"decode batch {b}", fmt(summarize(raw[f"b{b}"]), 0), f"{limit:.0f}",
                         fmt(metrics[f"decode_b{b}_vs_bandwidth_limit"])])
        sft = [sft_tokens_per_s(model_dir, data, Path(tmp) / f"sft{r}", seq_len, 10 if quick else 30)
               for r in range(repeats)]
    metrics["sft_tokens_per_s"] = summarize(sft, unit="tokens/s")
    mfu = None
    if sheet:
        metrics["sft_mfu"] = mfu = summarize([6 * params * t / sheet[1] for t in sft], unit="share")
    rows.append(["SFT tokens/s (bf16, packed)", fmt(metrics["sft_tokens_per_s"], 0), "-",
                 f"MFU {fmt(mfu, 3)}" if mfu else "MFU: peak FLOP/s of this device unknown"])
    fp8_rows = []
    if torch.cuda.get_device_capability(0) >= (8, 9):
        for m, k, n in ((16, 2048, 2048), (2048, 2048, 4096), (8192, 4096, 4096)):
            err, speed = fp8_gemm(m, k, n)
            metrics[f"fp8_gemm_{m}x{k}x{n}_rel_error"] = summarize([err], unit="relative", better="lower")
            metrics[f"fp8_gemm_{m}x{k}x{n}_speed_vs_bf16"] = summarize([speed])
            fp8_rows.append([f"{m}x{k} @ {k}x{n}", f"{err:.4f}", f"{speed:.2f}"])
    else:
        fp8_rows.append(["-", f"FP8 needs SM89+; {name} is SM{''.join(map(str, torch.cuda.get_device_capability(0)))}", "-"])
    bw_line = f"measured copy bandwidth {bw / 1e12:.2f} TB/s" + (
        f" (datasheet {sheet[0] / 1e12:.2f} TB/s)" if sheet else "")
    md = (f"## GPU: decode vs bandwidth limit, SFT MFU, FP8 GEMM ({name})\n\n"
          f"Random Llama of {params / 1e9:.2f}B parameters (bf16), steerlm.generation.Engine on cuda, prompts of 128 "
          f"tokens, {new_tokens} new tokens; limit = batch x bandwidth / weight bytes ({bw_line}); median (min-max) "
          f"over {repeats} repeat(s).\n\n"
          + table(["run", "tokens/s", "bandwidth limit tokens/s", "ratio to limit"], rows)
          + "\n\nFP8 (e4m3, per-tensor scales, torch._scaled_mm) against bf16 on the same operands:\n\n"
          + table(["GEMM", "relative error", "bf16 time / FP8 time"], fp8_rows))
    record("gpu", command=command_line("bench/gpu.py"), info=machine(), metrics=metrics, markdown=md,
           extra={"device": name, "params": params, "copy_bandwidth": bw}, out=out)


if __name__ == "__main__":
    main()
