"""Conversion speed and peak memory: the streaming converter against a file copy and a load-the-whole-model one.

For synthetic random fp16 Llama checkpoints of several sizes (1, 2, 4 GB; 0.1 and 0.2 GB with --quick) and TP 1
and 4, each of these runs in its own child process:
- "copy":     shutil.copyfile of the same safetensors bytes (the speed a converter could at best reach);
- "stream":   `python build/convert_checkpoint.py` (its click entry point, in-process), fp16 output;
- "baseline": what the upstream converter does: load every tensor, build every rank's dict, save_file;
- "imports":  only the imports, so peak RSS can be read net of the interpreter and torch;
- "engine-fp8": `make engine DTYPE=fp8` of the new Hugging Face / ModelOpt path (steerlm.convert), when this
  checkout has it; the whole command (calibration, conversion, checks) is timed.
Peak RSS is each child's own high-water mark (VmHWM in /proc/self/status, which starts afresh at exec;
getrusage would count the parent's pages inherited at fork). Each child times only its conversion, after its
imports. GB/s and RSS are reported as ratios: speed against the copy of the same bytes in the same repeat,
memory above imports against the model size.

    .venv/bin/python -m bench.convert_memory [--quick] [--sizes-gb 1,2,4] [--tp 1,4] [--repeats 3]
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bench.common import command_line, fmt, machine, not_available, out_option, ratios, record, repeat, summarize, table

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


def child(mode: str, model: str, out: str, tp: int) -> None:
    import torch  # noqa: F401  (every mode pays for the same imports)
    from safetensors.torch import load_file, save_file

    from steerlm.convert import legacy
    from steerlm.convert.stream import joined
    from steerlm.convert.trtllm_ckpt import LlamaDims, rank_units

    t0 = time.perf_counter()
    if mode == "copy":
        Path(out).mkdir()
        shutil.copyfile(Path(model) / "model.safetensors", Path(out) / "model.safetensors")
    elif mode in ("stream", "stream-profile"):
        argv = ["--model_dir", model, "--output_dir", out, "--tp_size", str(tp), "--dtype", "float16"]
        if mode == "stream":
            legacy.main.main(argv, standalone_mode=False)
        else:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.runcall(legacy.main.main, argv, standalone_mode=False)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(16)
            print("PROFILE_BEGIN\n" + text.getvalue().strip() + "\nPROFILE_END")
    elif mode == "baseline":
        everything = load_file(Path(model) / "model.safetensors")
        dims = LlamaDims.from_model_dir(model)
        ranks: list[dict] = [{} for _ in range(tp)]
        for unit in rank_units(everything.__getitem__, everything.__contains__, dims, tp, torch.float16):
            for r, tensors in enumerate(unit):
                ranks[r].update((name, joined(t)) for name, t in tensors)
        Path(out).mkdir()
        for r, tensors in enumerate(ranks):
            save_file(tensors, str(Path(out) / f"rank{r}.safetensors"))
    elif mode == "engine-fp8":
        proc = subprocess.run([sys.executable, str(ROOT / "build" / "build_engine.py"), "--model_dir", model,
                               "--tp_size", str(tp), "--dtype", "fp8", "--gpu", "h100", "--output_dir", out],
                              capture_output=True, text=True)
        if proc.returncode not in (0, 3):  # 3: no TensorRT-LLM here, the checkpoint is written and checked
            raise SystemExit(f"make engine failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    seconds = time.perf_counter() - t0
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    if mode == "engine-fp8":  # the work ran in a grandchild: count its peak too
        import resource

        hwm_kib = max(hwm_kib, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(f"BENCH {seconds:.4f} {hwm_kib}")


def run_child(mode: str, model: Path, out: Path, tp: int) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one conversion in a fresh process; its output is removed afterwards."""
    return _child_output(mode, model, out, tp)[:2]


def profile_stream(model: Path, out: Path, tp: int) -> str:
    """cProfile of one streaming conversion, top functions by cumulative time."""
    text = _child_output("stream-profile", model, out, tp)[2]
    return text.split("PROFILE_BEGIN\n", 1)[1].split("\nPROFILE_END", 1)[0]


def _child_output(mode: str, model: Path, out: Path, tp: int) -> tuple[float, float, str]:
    proc = subprocess.run([sys.executable, "-m", "bench.convert_memory", "--child", mode, "--model", str(model), "--child-out", str(out),
                           "--tp", str(tp)], capture_output=True, text=True, cwd=ROOT)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} conversion failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    _, seconds, kib = next(line for line in proc.stdout.splitlines() if line.startswith("BENCH ")).split()
    return float(seconds), int(kib) / 1024, proc.stdout


def new_path_available() -> bool:
    """The FP8 / Hugging Face `make engine` path lives in the package steerlm.convert (branch `build`)."""
    return importlib.util.find_spec("steerlm.convert") is not None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="0.1 and 0.2 GB models, TP 1 and 4, one repeat.")
@click.option("--sizes-gb", default=None, help="Comma-separated model sizes in GB (default 1,2,4; 0.1,0.2 with --quick).")
@click.option("--tp", "tps", default="1,4", show_default=True, help="Comma-separated tensor-parallel sizes.")
@click.option("--repeats", type=int, default=None, help="Repeats (default 3, 1 with --quick).")
@click.option("--hidden", default=None, type=int, help="Model width (default 2048; 512 with --quick).")
@click.option("--vocab", default=32000, show_default=True)
@click.option("--baseline-max-gb", default=4.0, show_default=True,
              help="Skip the load-whole-model converter above this size (it needs ~2x the model in RAM).")
@click.option("--child", type=click.Choice(["copy", "stream", "stream-profile", "baseline", "imports", "engine-fp8"]),
              hidden=True)
@click.option("--model", hidden=True)
@click.option("--child-out", hidden=True)
@out_option
def main(quick, sizes_gb, tps, repeats, hidden, vocab, baseline_max_gb, child, model, child_out, out) -> None:
    """Conversion GB/s (vs a plain copy) and peak RSS (vs a load-whole-model converter) by model size and TP."""
    tp_list = [int(t) for t in tps.split(",")]
    if child:
        return globals()["child"](child, model, child_out, tp_list[0])
    sizes = [float(s) for s in (sizes_gb or ("0.1,0.2" if quick else "1,2,4")).split(",")]
    repeats = repeats or (1 if quick else 3)
    hidden = hidden or (512 if quick else 2048)
    modes = ["copy", "stream"] + (["engine-fp8"] if new_path_available() else [])
    metrics: dict = {}
    rows, mem_rows = [], []
    profile = None
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=None))
    try:
        for size in sizes:
            layers = layers_for(size * 1e9, hidden, vocab)
            model_dir = work / f"model-{size:g}gb"
            nbytes = make_model(model_dir, hidden, layers, vocab)
            mib = nbytes / 2**20
            for tp in tp_list:
                use = modes + (["baseline"] if size <= baseline_max_gb else [])

                def one(r: int, model_dir=model_dir, tp=tp, use=use, nbytes=nbytes, size=size) -> dict[str, float]:
                    figs = {"imports_mib": run_child("imports", model_dir, work / "o", tp)[1]}
                    for mode in use:
                        seconds, peak = run_child(mode, model_dir, work / "o", tp)
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
                rss_vs = (fmt(summarize(ratios(above["baseline"], above["stream"]), better="lower"), 1)
                          if "baseline" in use else "skipped (> --baseline-max-gb)")
                rows.append([f"{size:g} GB ({mib:.0f} MiB, {layers} layers)", tp,
                             fmt(summarize(raw["copy_gbs"], unit="GB/s")),
                             fmt(metrics[f"{key}/stream_speed_vs_copy"]),
                             fmt(metrics[f"{key}/baseline_speed_vs_copy"]) if "baseline" in use else "-",
                             fmt(metrics[f"{key}/engine-fp8_speed_vs_copy"]) if "engine-fp8" in use else "not available in this checkout"])
                mem_rows.append([f"{size:g} GB", tp, f"{summarize(raw['imports_mib'])['median']:.0f}",
                                 f"{summarize(above['stream'])['median']:.0f}",
                                 fmt(metrics[f"{key}/stream_rss_above_imports_per_model_size"]),
                                 f"{summarize(above['baseline'])['median']:.0f}" if "baseline" in use else "-",
                                 rss_vs])
            if size == sizes[-1] and metrics[f"{size:g}gb_tp{tp_list[0]}/stream_speed_vs_copy"]["median"] < SPEED_TARGET:
                click.echo(f"  streaming converter under {SPEED_TARGET}x copy speed at {size:g} GB; profiling", err=True)
                profile = (size, profile_stream(model_dir, work / "o", tp_list[0]))
            shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra = {} if new_path_available() else {"engine_fp8": not_available(
        "make engine DTYPE=fp8 (Hugging Face / ModelOpt path)", "steerlm.convert is not in this checkout (branch build)")}
    md = (f"## Checkpoint conversion: speed and peak memory\n\n"
          f"Random fp16 Llama checkpoints (width {hidden}, vocab {vocab}), fp16 TensorRT-LLM output; each conversion in "
          f"its own process, timed after its imports; median (min-max) over {repeats} repeat(s). "
          f"Target: >= {SPEED_TARGET}x copy speed, peak RSS flat in model size.\n\n"
          + table(["model", "TP", "copy GB/s (this machine)", "streaming converter / copy speed",
                   "load-whole-model / copy speed", "make engine fp8 (HF path) / copy speed"], rows)
          + "\n\nPeak RSS (MiB, median); 'above imports' is the child's peak minus an imports-only child's.\n\n"
          + table(["model", "TP", "imports only", "streaming, above imports", "streaming above imports / model size",
                   "load-whole-model, above imports", "load-whole-model / streaming (above imports)"], mem_rows))
    if profile:
        md += (f"\n\nThe streaming converter misses {SPEED_TARGET}x copy speed; cProfile of one conversion (TP {tp_list[0]}) of the "
               f"{profile[0]:g} GB model, top functions by cumulative time:\n\n```\n{profile[1]}\n```")
    record("convert_memory", command=command_line("bench/convert_memory.py"), info=machine(), metrics=metrics,
           markdown=md, extra=extra, out=out)


if __name__ == "__main__":
    main()
