"""Conversion speed and peak memory: the streaming converter against a file copy and a load-the-whole-model one.

For synthetic random fp16 Llama checkpoints of several sizes (1, 2, 4 GB; 0.1 and 0.2 GB with --quick) and TP 1
and 4, each of these runs in its own child process:
- "copy":     shutil.copyfile of the same safetensors bytes (the speed a converter could at best reach);
- "stream":   `python build/convert_checkpoint.py` (its click entry point, in-process), fp16 output: the legacy
  `make engine ENGINE=legacy` conversion, one rank*.safetensors per TP rank;
- "hf16":     the conversion step of `make engine` (LLM API path, steerlm.convert.hf_checkpoint) to fp16, the
  source dtype: one model.safetensors whatever the TP (the LLM API splits at load time), so it runs at the
  first TP only;
- "hf-fp8":   the same step with DTYPE=fp8: ModelOpt-format FP8 weights and scales. Calibration and the reference
  check of `make engine` load the whole model in float32 and are not part of the streaming conversion, so the
  scales come from fixed activation ranges here (the work per tensor is the same);
- "baseline": what the upstream converter does: load every tensor, build every rank's dict, save_file;
- "imports":  only the imports, so peak RSS can be read net of the interpreter and torch.
Peak RSS is each child's own high-water mark (VmHWM in /proc/self/status, which starts afresh at exec;
getrusage would count the parent's pages inherited at fork). Each child times only its conversion, after its
imports. GB/s and RSS are reported as ratios: speed against the copy of the same bytes in the same repeat,
memory above imports against the model size. A converter under the speed target at the largest size is
profiled once (cProfile), and its time is split into what it was spent on (see `time_shares`).

    .venv/bin/python -m bench.convert_memory [--quick] [--sizes-gb 1,2,4] [--tp 1,4] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bench.common import command_line, fmt, machine, out_option, passive_omp, ratios, record, repeat, summarize, table

ROOT = Path(__file__).resolve().parents[1]

SPEED_TARGET = 0.5  # of copy speed


def llama_shapes(hidden: int, layers: int, vocab: int) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    heads, kv, inter = hidden // 64, max(hidden // 256, 4), hidden * 4
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
           "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
           "torch_dtype": "float16"}
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,)),
                   (f"{p}.self_attn.q_proj.weight", (hidden, hidden)), (f"{p}.self_attn.k_proj.weight", (kv * 64, hidden)),
                   (f"{p}.self_attn.v_proj.weight", (kv * 64, hidden)), (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
                   (f"{p}.mlp.gate_proj.weight", (inter, hidden)), (f"{p}.mlp.up_proj.weight", (inter, hidden)),
                   (f"{p}.mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return cfg, shapes


def layers_for(size_bytes: float, hidden: int, vocab: int) -> int:
    """Layers that bring an fp16 Llama of this width to about `size_bytes`."""
    def nbytes(layers: int) -> int:
        total = 0
        for _, shape in llama_shapes(hidden, layers, vocab)[1]:
            n = 1
            for d in shape:
                n *= d
            total += 2 * n
        return total
    per_layer = nbytes(2) - nbytes(1)
    return max(1, round((size_bytes - nbytes(0)) / per_layer))


def make_model(out: Path, hidden: int, layers: int, vocab: int) -> int:
    import torch

    from steerlm.convert.stream import StreamingWriter

    cfg, shapes = llama_shapes(hidden, layers, vocab)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    with StreamingWriter(out / "model.safetensors", [(n, s, torch.float16) for n, s in shapes], {"format": "pt"}) as w:
        for name, shape in shapes:
            w.write(name, (torch.randn(shape, generator=g) * 0.02).half())
    return (out / "model.safetensors").stat().st_size


CONVERTERS = {"stream": "streaming converter (legacy TensorRT-LLM checkpoint)",
              "hf16": "make engine fp16 (HF path)", "hf-fp8": "make engine fp8 (HF path)"}
TP_FREE = ("hf16", "hf-fp8")  # one file whatever the TP: measured at the first TP only
MODES = ("copy", "stream", "hf16", "hf-fp8", "baseline", "imports")
# Where a profiled conversion spends its time: (label, function, caller or None for any caller). Each entry takes
# the function's own time (as called from that caller); what no entry claims is "other". Python functions are
# named FILE:FUNCTION.
SHARES = [
    ("copy unchanged bytes file to file (sendfile, as the copy does)", "<built-in method posix.sendfile>", None),
    ("write computed bytes", "<method 'write' of '_io.FileIO' objects>", None),
    ("gather TP column shards (split along dim 1)", "stream.py:_write_part", None),
    ("FP8 quantization (float32, divide, clamp, cast)", "<method 'to' of 'torch._C.TensorBase' objects>", "quantize_fp8"),
    ("FP8 quantization (float32, divide, clamp, cast)", "<method 'div_' of 'torch._C.TensorBase' objects>", "quantize_fp8"),
    ("FP8 quantization (float32, divide, clamp, cast)", "<method 'clamp_' of 'torch._C.TensorBase' objects>", "quantize_fp8"),
    ("FP8 quantization (float32, divide, clamp, cast)", "<method 'copy_' of 'torch._C.TensorBase' objects>", "quantize_fp8"),
    ("FP8 weight amax", "<built-in method torch.aminmax>", None),
    ("dtype cast", "<method 'to' of 'torch._C.TensorBase' objects>", "hf_tensors"),
    ("dtype cast", "<method 'to' of 'torch._C.TensorBase' objects>", "replicated"),
    ("dtype cast", "<method 'to' of 'torch._C.TensorBase' objects>", "<listcomp>"),
    ("map source tensors (mmap, populated)", "stream.py:get", None),
]
FP8_ACT_AMAX = 4.0  # fixed activation range standing in for calibration


def time_shares(prof, seconds: float) -> list[tuple[str, float]]:
    """(label, share of `seconds`) per SHARES label, then "other (Python, headers, layout pass)"."""
    import pstats

    stats = pstats.Stats(prof).stats
    shares: dict[str, float] = {}
    for (file, _, func), (_, _, tottime, _, callers) in stats.items():
        for label, name, caller in SHARES:
            if name not in (func, f"{Path(file).name}:{func}"):
                continue
            own = tottime if caller is None else sum(t[2] for (_, _, c), t in callers.items() if c == caller)
            shares[label] = shares.get(label, 0.0) + own
    out = sorted(((k, v / seconds) for k, v in shares.items() if v > 0), key=lambda kv: -kv[1])
    return out + [("other (Python, headers, layout pass)", max(0.0, 1 - sum(v for _, v in out)))]


def fp8_stats(model: str):
    from steerlm.convert.hf_checkpoint import LINEARS
    from steerlm.convert.trtllm_ckpt import Fp8Stats, LlamaDims

    layers = LlamaDims.from_model_dir(model).num_layers
    return Fp8Stats({f"model.layers.{i}.{m}": FP8_ACT_AMAX for i in range(layers) for m in LINEARS},
                    {i: FP8_ACT_AMAX for i in range(layers)})


def conversion(mode: str, model: str, out: str, tp: int):
    """The work of `mode` as a callable (imports done, inputs ready), so that only the conversion is timed."""
    import torch
    from safetensors.torch import load_file, save_file

    from steerlm.convert import legacy
    from steerlm.convert.hf_checkpoint import write_hf_checkpoint
    from steerlm.convert.stream import joined
    from steerlm.convert.trtllm_ckpt import LlamaDims, rank_units
    from steerlm.files import staged_dir

    def copy() -> None:
        Path(out).mkdir()
        shutil.copyfile(Path(model) / "model.safetensors", Path(out) / "model.safetensors")

    def stream() -> None:
        legacy.main.main(["--model_dir", model, "--output_dir", out, "--tp_size", str(tp), "--dtype", "float16"],
                         standalone_mode=False)

    def hf(stats) -> None:
        with staged_dir(out) as tmp:  # as make engine stages its output
            write_hf_checkpoint(model, tmp, "float16", stats)

    def baseline() -> None:
        everything = load_file(Path(model) / "model.safetensors")
        dims = LlamaDims.from_model_dir(model)
        ranks: list[dict] = [{} for _ in range(tp)]
        for unit in rank_units(everything.__getitem__, everything.__contains__, dims, tp, torch.float16):
            for r, tensors in enumerate(unit):
                ranks[r].update((name, joined(t)) for name, t in tensors)
        Path(out).mkdir()
        for r, tensors in enumerate(ranks):
            save_file(tensors, str(Path(out) / f"rank{r}.safetensors"))

    stats = fp8_stats(model) if mode == "hf-fp8" else None
    return {"copy": copy, "stream": stream, "hf16": lambda: hf(None), "hf-fp8": lambda: hf(stats),
            "baseline": baseline, "imports": lambda: None}[mode]


def child(mode: str, model: str, out: str, tp: int, profile: bool) -> None:
    work = conversion(mode, model, out, tp)  # every mode pays for the same imports first
    prof = None
    t0 = time.perf_counter()
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.runcall(work)
    else:
        work()
    seconds = time.perf_counter() - t0
    if prof is not None:
        print("SHARES " + json.dumps(time_shares(prof, seconds)))
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print(f"BENCH {seconds:.4f} {hwm_kib}")


def run_child(mode: str, model: Path, out: Path, tp: int, profile: bool = False,
              threads: int | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of one conversion in a fresh process; its output is removed afterwards."""
    os.sync()  # dirty pages left by the previous run are written back now, not during this one
    proc = subprocess.run([sys.executable, "-m", "bench.convert_memory", "--child", mode, "--model", str(model),
                           "--child-out", str(out), "--tp", str(tp)] + (["--child-profile"] if profile else [])
                          + (["--threads", str(threads)] if threads else []),
                          capture_output=True, text=True, cwd=ROOT)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} conversion failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    _, seconds, kib = next(line for line in proc.stdout.splitlines() if line.startswith("BENCH ")).split()
    return float(seconds), int(kib) / 1024, proc.stdout


def profile_shares(mode: str, model: Path, out: Path, tp: int,
                   threads: int | None) -> tuple[float, list[tuple[str, float]]]:
    """One profiled conversion: (seconds under cProfile, [(what, share of the time)])."""
    seconds, _, stdout = run_child(mode, model, out, tp, profile=True, threads=threads)
    return seconds, json.loads(next(line for line in stdout.splitlines() if line.startswith("SHARES "))[7:])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="0.1 and 0.2 GB models, TP 1 and 4, one repeat.")
@click.option("--sizes-gb", default=None, help="Comma-separated model sizes in GB (default 1,2,4; 0.1,0.2 with --quick).")
@click.option("--tp", "tps", default="1,4", show_default=True, help="Comma-separated tensor-parallel sizes.")
@click.option("--repeats", type=int, default=None, help="Repeats (default 3, 1 with --quick).")
@click.option("--hidden", default=None, type=int, help="Model width (default 2048; 512 with --quick).")
@click.option("--vocab", default=32000, show_default=True)
@click.option("--baseline-max-gb", default=4.0, show_default=True,
              help="Skip the load-whole-model converter above this size (it needs ~2x the model in RAM).")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads in each conversion (default: torch's own, one per core). On cores other "
                   "jobs share, 1 avoids the thread pool's wake-up cost per operation.")
@click.option("--child", type=click.Choice(MODES), hidden=True)
@click.option("--child-profile", is_flag=True, hidden=True)
@click.option("--model", hidden=True)
@click.option("--child-out", hidden=True)
@out_option
def main(quick, sizes_gb, tps, repeats, hidden, vocab, baseline_max_gb, threads, child, child_profile, model,
         child_out, out) -> None:
    """Conversion GB/s (vs a plain copy) and peak RSS (vs a load-whole-model converter) by model size and TP."""
    passive_omp()  # as build/build_engine.py and build/convert_checkpoint.py do; children inherit it
    tp_list = [int(t) for t in tps.split(",")]
    if child:
        if threads:
            import torch

            torch.set_num_threads(threads)
        return globals()["child"](child, model, child_out, tp_list[0], child_profile)
    sizes = [float(s) for s in (sizes_gb or ("0.1,0.2" if quick else "1,2,4")).split(",")]
    repeats = repeats or (1 if quick else 3)
    hidden = hidden or (512 if quick else 2048)
    metrics: dict = {}
    rows, mem_rows, profiles = [], [], []
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=None))
    try:
        for size in sizes:
            layers = layers_for(size * 1e9, hidden, vocab)
            model_dir = work / f"model-{size:g}gb"
            nbytes = make_model(model_dir, hidden, layers, vocab)
            mib = nbytes / 2**20
            for tp in tp_list:
                use = ["copy", "stream"] + (list(TP_FREE) if tp == tp_list[0] else []) + (
                    ["baseline"] if size <= baseline_max_gb else [])

                def one(r: int, model_dir=model_dir, tp=tp, use=use, nbytes=nbytes, size=size) -> dict[str, float]:
                    figs = {"imports_mib": run_child("imports", model_dir, work / "o", tp)[1]}
                    # Each repeat starts with a different mode, so none always runs after another's writes.
                    for mode in use[r % len(use):] + use[: r % len(use)]:
                        seconds, peak, _ = run_child(mode, model_dir, work / "o", tp, threads=threads)
                        figs[f"{mode}_gbs"] = nbytes / 1e9 / seconds
                        figs[f"{mode}_mib"] = peak
                    click.echo(f"  {size:g} GB tp {tp} repeat {r + 1}: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in figs.items()), err=True)
                    return figs

                raw = repeat(one, repeats)
                key = f"{size:g}gb_tp{tp}"
                above = {m: [p - i for p, i in zip(raw[f"{m}_mib"], raw["imports_mib"])] for m in use}
                for m in use:
                    if m != "copy":
                        metrics[f"{key}/{m}_speed_vs_copy"] = summarize(ratios(raw[f"{m}_gbs"], raw["copy_gbs"]))
                    metrics[f"{key}/{m}_rss_above_imports_per_model_size"] = summarize(
                        [a / mib for a in above[m]], unit="share", better="lower")

                def speed(m: str, key=key, use=use) -> str:
                    if m in use:
                        return fmt(metrics[f"{key}/{m}_speed_vs_copy"])
                    return f"= TP {tp_list[0]} (one file; TP at load time)" if m in TP_FREE else "-"

                def rss(m: str, use=use, above=above) -> str:
                    return f"{summarize(above[m])['median']:.0f}" if m in use else "-"

                rss_vs = (fmt(summarize(ratios(above["baseline"], above["stream"]), better="lower"), 1)
                          if "baseline" in use else "skipped (> --baseline-max-gb)")
                rows.append([f"{size:g} GB ({mib:.0f} MiB, {layers} layers)", tp,
                             fmt(summarize(raw["copy_gbs"], unit="GB/s")), speed("stream"), speed("hf16"),
                             speed("hf-fp8"), speed("baseline")])
                mem_rows.append([f"{size:g} GB", tp, f"{summarize(raw['imports_mib'])['median']:.0f}",
                                 rss("stream"), fmt(metrics[f"{key}/stream_rss_above_imports_per_model_size"]),
                                 rss("hf16"), rss("hf-fp8"), rss("baseline"), rss_vs])
                if size == sizes[-1]:
                    for m in [m for m in CONVERTERS if m in use]:
                        if metrics[f"{key}/{m}_speed_vs_copy"]["median"] < SPEED_TARGET:
                            click.echo(f"  {m} at TP {tp} under {SPEED_TARGET}x copy speed; profiling", err=True)
                            profiles.append((m, tp, size, *profile_shares(m, model_dir, work / "o", tp, threads)))
            shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = (f"## Checkpoint conversion: speed and peak memory\n\n"
          f"Random fp16 Llama checkpoints (width {hidden}, vocab {vocab}); each conversion in its own process "
          f"({f'{threads} torch thread(s)' if threads else 'torch default threads'}), timed after its imports; "
          f"median (min-max) over {repeats} repeat(s), each against the copy of the same repeat. "
          f"Streaming converter: fp16 TensorRT-LLM checkpoint, one file per rank (`make engine ENGINE=legacy`). "
          f"HF path: the conversion step of `make engine` (one model.safetensors; fp16 = the source dtype, fp8 = "
          f"ModelOpt FP8 with scales from fixed activation ranges: calibration and the reference check load the "
          f"whole model and are not timed here). Target: >= {SPEED_TARGET}x copy speed, peak RSS flat in model size. "
          f"At TP > 1 the legacy checkpoint holds more bytes than its source (embeddings, norms and the vocabulary "
          f"padding are replicated per rank), so its best case is below 1x.\n\n"
          + table(["model", "TP", "copy GB/s (this machine)", f"{CONVERTERS['stream']} / copy speed",
                   f"{CONVERTERS['hf16']} / copy speed", f"{CONVERTERS['hf-fp8']} / copy speed",
                   "load-whole-model / copy speed"], rows)
          + "\n\nPeak RSS (MiB, median); 'above imports' is the child's peak minus an imports-only child's.\n\n"
          + table(["model", "TP", "imports only", "streaming, above imports", "streaming above imports / model size",
                   "HF fp16, above imports", "HF fp8, above imports", "load-whole-model, above imports",
                   "load-whole-model / streaming (above imports)"], mem_rows))
    for m, tp, size, seconds, shares in profiles:
        md += (f"\n\n{CONVERTERS[m]} at TP {tp}, {size:g} GB, under {SPEED_TARGET}x copy speed: one profiled run "
               f"({seconds:.1f} s under cProfile), where the time went:\n\n"
               + table(["spent on", "share of the time"], [[what, f"{share:.0%}"] for what, share in shares]))
    if profiles:
        md += ("\n\nReading the splits: 'sendfile' is the kernel path the plain copy takes, so time there is time the "
               "copy would spend on the same bytes; 'write computed bytes' is what the converter had to change (FP8 "
               "weights, casts, TP column shards) written from memory; both include the page cache's writeback "
               "stalls, which the copy meets too. FP8 adds float32 arithmetic per weight element (quantization, amax). "
               "At TP > 1 the legacy checkpoint writes more bytes than it reads (embeddings and norms once per "
               "rank), and its column shards (attention dense, MLP proj: about a third of each layer) cannot go "
               "file to file: they are gathered, then written.")
    extra = {"profiles": [{"converter": m, "tp": tp, "size_gb": size, "seconds": seconds, "shares": dict(shares)}
                          for m, tp, size, seconds, shares in profiles]}
    record("convert_memory", command=command_line("bench/convert_memory.py"), info=machine(), metrics=metrics,
           markdown=md, extra=extra, out=out)


if __name__ == "__main__":
    main()
