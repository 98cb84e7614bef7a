"""In-flight batching: what the CPU engine gains from concurrent requests, and against `transformers` generate.

For each model shape (the tiny test model and a ~100M-parameter Llama with random weights), the same N prompts
of a fixed length, each generating a fixed number of tokens (no end id, so every request runs to max_tokens):
- engine, one request at a time (the baseline every ratio divides by);
- engine with 4, 16, 32 requests in flight (Engine.submit; a new request enters as one leaves);
- `transformers` generate one prompt at a time, and padded batches of 16 (greedy, min_new_tokens = max);
- with `--against REV`: the engine of another commit (its steerlm/generation.py, imported next to this one) one
  at a time and 16 concurrent, right after this engine in every repeat: a before/after ratio for an engine change.
Throughput is generated tokens per second of wall time. If the larger shape misses its target (>= 4x at 16
concurrent), a cProfile summary of the engine thread over one 16-concurrent run shows where the time goes.

    .venv/bin/python -m bench.batching [--quick] [--repeats 3] [--against main]
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from bench.common import (
    ROOT,
    command_line,
    fmt,
    machine,
    out_option,
    passive_omp,
    ratios,
    record,
    repeat,
    summarize,
    table,
)

CONCURRENCY = (4, 16, 32)
HF_BATCH = 16
TARGET = 4.0  # at 16 concurrent, on the larger shape
# ~100M parameters: 10 layers of 768 with GQA and a 16k vocabulary (untied embeddings), random weights.
SHAPES = {
    "tiny": None,
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=16384),
}


def make_model(shape: str, out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if SHAPES[shape] is None:
        from steer_train.tiny import init_tiny

        return init_tiny(out)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def prompts_for(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Ids from 4 up: clear of the special tokens of either shape.
    return torch.randint(4, vocab, (n, length), generator=g).tolist()


def engine_at(rev: str, tmp: Path):
    """The module steerlm.generation as of git revision `rev`, imported under a name of its own."""
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:steerlm/generation.py"], capture_output=True,
                           text=True)
    if shown.returncode:
        raise click.BadParameter(f"no steerlm/generation.py at {rev!r}: {shown.stderr.strip()}", param_hint="--against")
    path = tmp / "generation_against.py"
    path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("generation_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def engine_throughput(engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> float:
    """Generated tokens per second with at most `concurrency` requests in flight."""
    from steerlm.generation import GenerationRequest, SamplingParams

    slots = threading.Semaphore(concurrency)
    finished = threading.Event()
    lock = threading.Lock()
    produced = [0, 0]  # tokens, finished requests
    errors: list[str] = []

    def emit(tokens: list[int], final: bool) -> None:
        with lock:
            produced[0] += len(tokens)
            if final:
                produced[1] += 1
                if produced[1] == len(prompts):
                    finished.set()
        if final:
            slots.release()

    def fail(msg: str) -> None:
        errors.append(msg)
        finished.set()
        slots.release()

    t0 = time.perf_counter()
    for ids in prompts:
        slots.acquire()
        if errors:
            break
        engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=max_tokens), emit, fail=fail))
    if not finished.wait(3600):
        raise TimeoutError("engine did not finish within an hour")
    dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    if produced[0] != len(prompts) * max_tokens:
        raise RuntimeError(f"expected {len(prompts) * max_tokens} tokens, got {produced[0]}")
    return produced[0] / dt


def hf_throughput(model, prompts: list[list[int]], max_tokens: int, batch: int, pad_id: int) -> float:
    import torch

    t0 = time.perf_counter()
    produced = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i: i + batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
            produced += (out.shape[1] - width) * len(chunk)
    return produced / (time.perf_counter() - t0)


def profile_summary(model_dir: Path, prompts, max_tokens: int, concurrency: int, rows: int = 15) -> str:
    """cProfile of the engine's own thread over one run, top functions by own time.

    The engine works on a thread of its own, which neither torch.profiler nor cProfile started on this thread
    sees; so a fresh engine is started with a thread profile hook that turns cProfile on inside its thread."""
    import cProfile
    import io
    import pstats

    from steerlm.generation import Engine

    profiles: list[cProfile.Profile] = []

    def hook(*_):
        sys.setprofile(None)
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()

    threading.setprofile(hook)
    try:
        engine = Engine(model_dir, max_batch_size=concurrency)
    finally:
        threading.setprofile(None)
    try:
        engine_throughput(engine, prompts[:2], 2, 2)
        engine_throughput(engine, prompts, max_tokens, concurrency)
    finally:
        engine.close()
    text = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=text)
    for prof in profiles[1:]:
        stats.add(prof)
    stats.sort_stats("tottime").print_stats(rows)
    return text.getvalue().strip()


def bench_shape(shape: str, work: Path, n: int, isl: int, osl: int, repeats: int, log, against=None
                ) -> tuple[dict, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from steerlm.generation import Engine

    model_dir = make_model(shape, work / shape)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = sum(p.numel() for p in hf.parameters())
    pad_id = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    prompts = prompts_for(hf.config.vocab_size, n, isl)
    levels = [c for c in CONCURRENCY if c <= n]
    engine = Engine(model_dir, max_batch_size=max(levels))
    other = against.Engine(model_dir, max_batch_size=max(levels)) if against else None
    top = 16 if 16 in levels else max(levels)
    try:
        for eng in (engine, other) if other else (engine,):
            engine_throughput(eng, prompts[:2], 2, 2)  # warm-up: first calls allocate

        def one(r: int) -> dict[str, float]:
            figs = {"engine_c1": engine_throughput(engine, prompts, osl, 1)}
            if other:
                figs["against_c1"] = engine_throughput(other, prompts, osl, 1)
            for c in levels:
                figs[f"engine_c{c}"] = engine_throughput(engine, prompts, osl, c)
                if other and c == top:
                    figs[f"against_c{c}"] = engine_throughput(other, prompts, osl, c)
            figs["hf_b1"] = hf_throughput(hf, prompts, osl, 1, pad_id)
            figs[f"hf_b{min(HF_BATCH, n)}"] = hf_throughput(hf, prompts, osl, min(HF_BATCH, n), pad_id)
            log(f"  {shape} repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in figs.items()))
            return figs

        raw = repeat(one, repeats)
        metrics = {}
        base = raw["engine_c1"]
        for name, values in raw.items():
            if name.startswith("against"):
                continue
            if name != "engine_c1":
                metrics[f"{shape}/{name}_vs_engine_c1"] = summarize(ratios(values, base))
            if name.startswith("engine_c") and name != "engine_c1":
                metrics[f"{shape}/{name}_vs_hf_b1"] = summarize(ratios(values, raw["hf_b1"]))
        if other:
            for c in (1, top):
                metrics[f"{shape}/engine_c{c}_vs_against_c{c}"] = summarize(ratios(raw[f"engine_c{c}"],
                                                                                   raw[f"against_c{c}"]))
            metrics[f"{shape}/against_c{top}_vs_against_c1"] = summarize(ratios(raw[f"against_c{top}"],
                                                                                raw["against_c1"]))
        info = {"params_m": params / 1e6, "levels": levels, "top": top}
        key = f"{shape}/engine_c16_vs_engine_c1"
        if shape != "tiny" and key in metrics and metrics[key]["median"] < TARGET:
            log(f"  {shape}: {metrics[key]['median']:.2f}x at 16 concurrent is under the {TARGET}x target; profiling")
            info["profile_c16"] = profile_summary(model_dir, prompts, osl, 16)
        return metrics, info
    finally:
        engine.close()
        if other:
            other.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="Small sizes and one repeat (a smoke run while developing).")
@click.option("--repeats", type=int, default=None, help="Repeats (default 3, 1 with --quick).")
@click.option("--shapes", default="tiny,llama-100m", show_default=True, help="Comma-separated: " + ", ".join(SHAPES))
@click.option("--requests", "n", type=int, default=None, help="Prompts per run (default 32, 16 with --quick).")
@click.option("--input-len", "isl", type=int, default=32, show_default=True, help="Prompt tokens.")
@click.option("--output-len", "osl", type=int, default=None, help="Generated tokens per request (default 32, 8 with --quick).")
@click.option("--against", metavar="REV", default=None,
              help="Also run the engine of git revision REV (its steerlm/generation.py) one at a time and 16 "
                   "concurrent, next to this one in every repeat: before/after ratios of an engine change.")
@click.option("--profile-only", is_flag=True,
              help="Only profile one 16-concurrent run per shape (section batching_profile); no throughput figures.")
@out_option
def main(quick, repeats, shapes, n, isl, osl, against, profile_only, out) -> None:
    """Throughput of the in-flight batching engine at 1/4/16/32 concurrent vs one at a time and vs HF generate."""
    passive_omp()  # before torch is imported
    import torch

    repeats = repeats or (1 if quick else 3)
    n = n or (16 if quick else 32)
    osl = osl or (8 if quick else 32)
    names = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = set(names) - set(SHAPES)
    if unknown:
        raise click.BadParameter(f"unknown shape(s) {sorted(unknown)}; choose from {', '.join(SHAPES)}", param_hint="--shapes")
    torch.manual_seed(0)
    if profile_only:
        parts = []
        with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
            for shape in names:
                model_dir = make_model(shape, Path(tmp) / shape)
                from transformers import AutoConfig

                prompts = prompts_for(AutoConfig.from_pretrained(model_dir).vocab_size, n, isl)
                parts.append(f"{shape}, {n} prompts of {isl} tokens, {osl} new tokens, 16 concurrent:\n\n```\n"
                             f"{profile_summary(model_dir, prompts, osl, 16)}\n```")
        md = ("## In-flight batching: where the engine's time goes\n\ncProfile of the engine thread (top functions by "
              "own time):\n\n" + "\n\n".join(parts))
        record("batching_profile", command=command_line("bench/batching.py"), info=machine(), metrics={},
               markdown=md, out=out)
        return
    metrics, infos = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        other = engine_at(against, Path(tmp)) if against else None
        for shape in names:
            m, info = bench_shape(shape, Path(tmp), n, isl, osl, repeats, lambda s: click.echo(s, err=True), other)
            metrics.update(m)
            infos[shape] = info
    rows = []
    for shape in names:
        levels = infos[shape]["levels"]
        row = [f"{shape} ({infos[shape]['params_m']:.1f}M)"]
        row += [fmt(metrics[f"{shape}/engine_c{c}_vs_engine_c1"]) for c in levels]
        row += [fmt(metrics[f"{shape}/hf_b1_vs_engine_c1"]), fmt(metrics[f"{shape}/hf_b{min(HF_BATCH, n)}_vs_engine_c1"])]
        row += [fmt(metrics[f"{shape}/engine_c16_vs_hf_b1"]) if 16 in levels else "-"]
        rows.append(row)
    levels = infos[names[0]]["levels"]
    md = (f"## In-flight batching (steerlm.generation.Engine, CPU)\n\n"
          f"{n} prompts of {isl} tokens, {osl} generated tokens each, greedy, fp32; throughput = generated tokens/s; "
          f"ratios per repeat against the engine running one request at a time, median (min-max) over {repeats} repeat(s).\n\n"
          + table(["model"] + [f"engine {c} concurrent" for c in levels]
                  + ["HF generate 1 at a time", f"HF generate batch {min(HF_BATCH, n)}", "engine 16 conc. vs HF 1 at a time"],
                  rows))
    if against:
        top = infos[names[0]]["top"]
        md += (f"\n\nThis engine against the engine at `{against}` (its steerlm/generation.py), each run right after "
               f"the other in every repeat:\n\n"
               + table(["model", f"this / {against}, 1 at a time", f"this / {against}, {top} concurrent",
                        f"{against}: {top} concurrent vs 1 at a time", f"this: {top} concurrent vs 1 at a time"],
                       [[shape, fmt(metrics[f"{shape}/engine_c1_vs_against_c1"]),
                         fmt(metrics[f"{shape}/engine_c{top}_vs_against_c{top}"]),
                         fmt(metrics[f"{shape}/against_c{top}_vs_against_c1"]),
                         fmt(metrics[f"{shape}/engine_c{top}_vs_engine_c1"])] for shape in names]))
    for shape in names:
        if "profile_c16" in infos[shape]:
            md += (f"\n\nTarget >= {TARGET}x at 16 concurrent not met on {shape}; cProfile of the engine thread over one "
                   f"16-concurrent run, top functions by own time:\n\n```\n{infos[shape]['profile_c16']}\n```")
    record("batching", command=command_line("bench/batching.py"), info=machine(), metrics=metrics, markdown=md,
           extra={"shapes": infos, "requests": n, "input_len": isl, "output_len": osl},
           out=out)


if __name__ == "__main__":
    main()
