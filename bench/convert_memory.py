"""Peak memory of the streaming TensorRT-LLM converter vs a load-the-whole-model baseline.

Generates a random Llama of a few hundred MB, then converts it in separate child processes:
- "stream":   steerlm.convert.legacy.convert (one tensor group in memory at a time);
- "baseline": what the upstream converter does, load every tensor, build every rank's dict, save_file;
- "imports":  only the imports, so the figures can be read net of the interpreter and torch.
Peak RSS is each child's own high-water mark (VmHWM in /proc/self/status, which starts afresh at exec;
getrusage would count the parent's pages inherited at fork). Results go to stdout and into BENCHMARKS.md.

    .venv/bin/python bench/convert_memory.py [--tp_size 2] [--layers 8] [--hidden 1024]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- convert_memory:begin -->", "<!-- convert_memory:end -->"


def make_model(out: Path, hidden: int, layers: int, vocab: int) -> int:
    import torch

    from steerlm.convert.stream import StreamingWriter

    heads, kv, inter = hidden // 64, max(hidden // 256, 1), hidden * 4
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
           "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,)),
                   (f"{p}.self_attn.q_proj.weight", (hidden, hidden)), (f"{p}.self_attn.k_proj.weight", (kv * 64, hidden)),
                   (f"{p}.self_attn.v_proj.weight", (kv * 64, hidden)), (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
                   (f"{p}.mlp.gate_proj.weight", (inter, hidden)), (f"{p}.mlp.up_proj.weight", (inter, hidden)),
                   (f"{p}.mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    with StreamingWriter(out / "model.safetensors", [(n, s, torch.float16) for n, s in shapes], {"format": "pt"}) as w:
        for name, shape in shapes:
            w.write(name, (torch.randn(shape) * 0.02).half())
    return (out / "model.safetensors").stat().st_size


def child(mode: str, model: str, out: str, tp: int) -> None:
    import torch  # noqa: F401  (every mode pays for the same imports)
    from safetensors.torch import load_file, save_file

    from steerlm.convert.legacy import convert
    from steerlm.convert.trtllm_ckpt import LlamaDims, rank_units

    if mode == "stream":
        convert(model, out, tp, "float16", progress=False)
    elif mode == "baseline":
        everything = load_file(Path(model) / "model.safetensors")
        dims = LlamaDims.from_model_dir(model)
        ranks: list[dict] = [{} for _ in range(tp)]
        for unit in rank_units(everything.__getitem__, everything.__contains__, dims, tp, torch.float16):
            for r, tensors in enumerate(unit):
                ranks[r].update(tensors)
        Path(out).mkdir()
        for r, tensors in enumerate(ranks):
            save_file(tensors, str(Path(out) / f"rank{r}.safetensors"))
    status = Path("/proc/self/status").read_text()
    print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def peak_rss_mib(mode: str, model: Path, out: Path, tp: int) -> float:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--model", str(model), "--out", str(out),
                           "--tp_size", str(tp)], check=True, capture_output=True, text=True)
    return int(proc.stdout.split()[-1]) / 1024  # kB -> MiB


@click.command()
@click.option("--tp_size", default=2, show_default=True)
@click.option("--layers", default=8, show_default=True)
@click.option("--hidden", default=1024, show_default=True)
@click.option("--vocab", default=32000, show_default=True)
@click.option("--child", type=click.Choice(["stream", "baseline", "imports"]), hidden=True)
@click.option("--model", hidden=True)
@click.option("--out", hidden=True)
def main(tp_size, layers, hidden, vocab, child, model, out) -> None:
    """Compare peak RSS of the streaming converter with a whole-model baseline; update BENCHMARKS.md."""
    if child:
        return globals()["child"](child, model, out, tp_size)
    work = Path(tempfile.mkdtemp(prefix="convert-memory-"))
    try:
        size = make_model(work / "model", hidden, layers, vocab) / 2**20
        imports = peak_rss_mib("imports", work / "model", work / "o0", tp_size)
        stream = peak_rss_mib("stream", work / "model", work / "o1", tp_size)
        baseline = peak_rss_mib("baseline", work / "model", work / "o2", tp_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = f".venv/bin/python bench/convert_memory.py --tp_size {tp_size} --layers {layers} --hidden {hidden} --vocab {vocab}"
    table = (
        f"{BEGIN}\n## Checkpoint conversion memory (build/convert_checkpoint.py)\n\n"
        f"`{command}` — random fp16 Llama of {size:.0f} MiB, TP {tp_size}, float16 output; peak RSS per child process.\n\n"
        "| converter | peak RSS (MiB) | above imports (MiB) | above imports / model size |\n|---|---|---|---|\n"
        f"| imports only | {imports:.0f} | 0 | 0 |\n"
        f"| streaming (this package) | {stream:.0f} | {stream - imports:.0f} | {(stream - imports) / size:.2f} |\n"
        f"| load whole model (upstream style) | {baseline:.0f} | {baseline - imports:.0f} | {(baseline - imports) / size:.2f} |\n\n"
        f"Streaming needs {(baseline - imports) / max(stream - imports, 1):.1f}x less memory above the imports; "
        "its peak tracks the largest tensor group (here the embedding / lm_head), not the model.\n"
        f"{END}\n"
    )
    click.echo(table)
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + table
    path.write_text(text)


if __name__ == "__main__":
    main()
