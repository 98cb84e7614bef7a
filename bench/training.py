"""Training throughput and loss: `steer_train sft` / `steer_train rm` against a `transformers` Trainer run.

Same model (a small random Llama with a tokenizer trained on the data), same data (the demo's weakly labelled
conversations), same tokenization and loss masking, same sequence length, optimizer (AdamW, weight decay 0),
peak LR, warm-up, cosine decay to 0.1 x LR, gradient clipping and epochs. Each run is a child process; after the
heavy imports (torch, transformers, matplotlib) it times the command from reading the data to the saved
checkpoint (`python -m steer_train sft|rm` is invoked in-process through its click entry point), and within it
the training loop (steer_train: its own `train_seconds` in metrics.jsonl, first to last optimizer step;
Trainer: the `trainer.train()` call). tokens/s = real (non-pad) tokens of the conversations x epochs / time,
the same count for both sides. Final loss is measured afterwards by one function on the held-out split for both.
- SFT: `python -m steer_train sft` (packed blocks of --seq-len) against Trainer on padded batches of whole
  conversations (what one would write with the library), with about as many conversations per step.
- RM: `python -m steer_train rm` against Trainer on the same RewardModel (backbone + head, masked MSE).
Packing efficiency is the share of non-pad tokens in the SFT blocks.

    .venv/bin/python -m bench.training [--quick] [--repeats 3]
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bench.common import ROOT, command_line, fmt, machine, out_option, ratios, record, repeat, summarize, table

SFT_TARGET, PACKING_TARGET = 1.3, 0.95


# ---------------------------------------------------------------- shared by parent and children


def sft_samples(model_dir: str, data: str) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of every conversation, by the code path `steer_train sft` uses."""
    from transformers import AutoTokenizer

    from steer_train.data import load_jsonl
    from steer_train.sft import loss_labels
    from steerlm.spec import load_spec

    spec = load_spec(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir).backend_tokenizer
    return [loss_labels(tok, spec.template, c) for c in load_jsonl(data, spec.schema)]


def rm_rows(model_dir: str, data: str):
    """(token ids, targets) of every rated turn, encoded as `steer_train rm` and serving encode them, and the
    RewardModel (backbone + new head) that encoded them."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from steer_train.data import load_jsonl
    from steer_train.rm import samples
    from steerlm.reward import RewardModel, RewardScorer
    from steerlm.spec import load_spec

    spec = load_spec(model_dir)
    model = RewardModel(AutoModel.from_pretrained(model_dir, dtype=torch.float32), len(spec.schema), "last")
    scorer = RewardScorer(model, AutoTokenizer.from_pretrained(model_dir).backend_tokenizer, spec)
    rows = samples(load_jsonl(data, spec.schema), spec)
    return [(scorer.encode(turns, system), targets) for turns, system, targets in rows], spec, model


# ---------------------------------------------------------------- Trainer children


def timed_train(trainer) -> None:
    t0 = time.perf_counter()
    trainer.train()
    print(f"BENCH_TRAIN_SECONDS {time.perf_counter() - t0:.3f}")


def _trainer_args(out: str, hp: dict, batch: int, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, num_train_epochs=hp["epochs"], learning_rate=hp["lr"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": hp["min_lr_ratio"]},
        warmup_steps=hp["warmup"], weight_decay=0.0, max_grad_norm=hp["grad_clip"], seed=hp["seed"],
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, **kw)


def hf_sft(model_dir: str, data: str, out: str, hp: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    samples = sft_samples(model_dir, data)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def collate(batch):
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (s_ids, s_labels) in enumerate(batch):
            ids[i, : len(s_ids)] = torch.tensor(s_ids)
            labels[i, : len(s_labels)] = torch.tensor(s_labels)
            mask[i, : len(s_ids)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model=model, args=_trainer_args(out, hp, hp["hf_batch"]), train_dataset=samples,
                      data_collator=collate)
    timed_train(trainer)
    trainer.save_model(out)
    tok.save_pretrained(out)


def hf_rm(model_dir: str, data: str, out: str, hp: dict) -> None:
    import torch
    from transformers import AutoTokenizer, Trainer

    from steer_train.rm import MISSING
    from steerlm.reward import RewardModel, pad_batch, save_reward_model

    torch.manual_seed(hp["seed"])  # the new head's initial weights, as steer_train rm seeds them
    rows, spec, inner = rm_rows(model_dir, data)
    inner.train()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    class WithLoss(torch.nn.Module):
        def __init__(self, inner: RewardModel):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, targets):
            pred = self.inner(input_ids, attention_mask)
            present = targets != MISSING
            return {"loss": ((pred - targets).pow(2) * present).sum() / present.sum().clamp(min=1)}

    def collate(batch):
        ids, mask = pad_batch([r[0] for r in batch], pad)
        return {"input_ids": ids, "attention_mask": mask, "targets": torch.tensor([r[1] for r in batch])}

    # The same two learning rates as steer_train rm: the new head at 10x; fused, as Trainer's default optimizer.
    opt = torch.optim.AdamW([{"params": inner.backbone.parameters(), "lr": hp["lr"]},
                             {"params": inner.head.parameters(), "lr": hp["lr"] * 10}], weight_decay=0.0, fused=True)
    trainer = Trainer(model=WithLoss(inner), args=_trainer_args(out, hp, hp["rm_batch"]), train_dataset=rows,
                      data_collator=collate, optimizers=(opt, None))
    timed_train(trainer)
    save_reward_model(out, inner.cpu(), tok, spec, hp["seq_len"])


# ---------------------------------------------------------------- measurement


def preimport() -> None:
    """What both kinds of child import before their timer starts (on a loaded 2-core machine imports alone take
    tens of seconds, which would swamp a small model's training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import steer_train.__main__  # noqa: F401
    import steer_train.rm  # noqa: F401
    import steer_train.sft  # noqa: F401


def steer_train_cli(argv: list[str]) -> None:
    from steer_train.__main__ import cli

    cli.main(argv, prog_name="steer_train", standalone_mode=False)


def torch_profile(fn, rows: int = 15) -> str:
    """torch.profiler table of fn(), top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """Seconds the child reported for the whole command (`BENCH_SECONDS x`) and its training loop
    (`BENCH_TRAIN_SECONDS x`)."""
    out = _run_child(cmd)
    return tuple(float(out.split(f"{key} ")[-1].split()[0]) for key in ("BENCH_SECONDS", "BENCH_TRAIN_SECONDS"))


def run_profiled(cmd: list[str]) -> str:
    out = _run_child(cmd)
    return out.split("PROFILE_BEGIN\n", 1)[1].split("\nPROFILE_END", 1)[0]


def steer_train_loop_seconds(argv: list[str]) -> float:
    """The training loop's wall time, which steer_train logs as the last record of OUT/metrics.jsonl."""
    out = Path(argv[argv.index("--out") + 1])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    if last.get("event") != "end":
        raise RuntimeError(f"{out}/metrics.jsonl does not end with the loop's time: {last}")
    return last["train_seconds"]


def _run_child(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    if "BENCH_SECONDS " not in proc.stdout:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... reported no time:\n{proc.stdout[-2000:]}")
    return proc.stdout


def heldout_sft_loss(model_dir: str, samples) -> float:
    """Token-mean cross entropy over answer tokens, one conversation at a time (no packing, no padding)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, labels in samples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / max(count, 1)


def heldout_rm_mse(model_dir: str, data: str) -> float:
    """Masked MSE of the reward model's raw predictions on the held-out rated turns."""
    from steer_train.data import load_jsonl
    from steer_train.rm import MISSING, samples
    from steerlm.reward import load_reward_model

    scorer = load_reward_model(model_dir)
    rows = samples(load_jsonl(data, scorer.spec.schema), scorer.spec)
    pred = scorer.score([r[0] for r in rows], [r[1] for r in rows], batch_size=16)
    se, n = 0.0, 0
    for p, (_, _, targets) in zip(pred, rows):
        for v, t in zip(p, targets):
            if t != MISSING:
                se, n = se + (float(v) - t) ** 2, n + 1
    return se / max(n, 1)


def prepare(work: Path, quick: bool) -> tuple[Path, Path, Path]:
    from steer_eval.demo_data import build_demo_data, corpus_texts
    from steer_train.data import load_jsonl
    from steer_train.tiny import init_tiny
    from steerlm.spec import SteerSpec

    paths = build_demo_data(work / "data")
    train, val = paths["train"], paths["val"]
    spec = SteerSpec()
    convs = load_jsonl(train, spec.schema)
    if quick:
        lines = train.read_text().splitlines()[:96]
        train.write_text("\n".join(lines) + "\n")
    size = dict(hidden_size=64, layers=2, heads=4, kv_heads=2) if quick else \
        dict(hidden_size=256, layers=4, heads=8, kv_heads=4)
    model = init_tiny(work / "base", spec, **size, vocab_size=2048, corpus=corpus_texts(convs))
    return model, train, val


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="A 2-layer 64-wide model on 96 conversations, one repeat.")
@click.option("--repeats", type=int, default=None, help="Repeats (default 3, 1 with --quick).")
@click.option("--seq-len", type=int, default=512, show_default=True, help="SFT block length / RM max length.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--rm-batch", type=int, default=8, show_default=True, help="Rated turns per RM step (both runs).")
@click.option("--threads", type=int, default=None,
              help="Torch threads of every training child (OMP_NUM_THREADS; default: torch's own choice). On a "
                   "machine shared with other work, 1 keeps a descheduled worker thread from stalling the rest.")
@click.option("--child", type=click.Choice(["hf-sft", "hf-rm", "steer-train", "steer-train-profile", "hf-sft-profile"]),
              hidden=True)
@click.option("--model", hidden=True)
@click.option("--data", hidden=True)
@click.option("--run-out", hidden=True)
@click.option("--hp", hidden=True)
@click.argument("argv", nargs=-1)
@out_option
def main(quick, repeats, seq_len, epochs, lr, rm_batch, threads, child, model, data, run_out, hp, argv, out) -> None:
    """steer_train sft / rm tokens/s and held-out loss against transformers Trainer; SFT packing efficiency."""
    if child:
        preimport()
        t0 = time.perf_counter()
        if child == "steer-train":
            steer_train_cli(list(argv))
            print(f"BENCH_TRAIN_SECONDS {steer_train_loop_seconds(list(argv)):.3f}")
        elif child == "steer-train-profile":
            print("PROFILE_BEGIN\n" + torch_profile(lambda: steer_train_cli(list(argv))) + "\nPROFILE_END")
        elif child == "hf-sft-profile":
            print("PROFILE_BEGIN\n" + torch_profile(lambda: hf_sft(model, data, run_out, json.loads(hp)))
                  + "\nPROFILE_END")
        else:
            {"hf-sft": hf_sft, "hf-rm": hf_rm}[child](model, data, run_out, json.loads(hp))
        print(f"BENCH_SECONDS {time.perf_counter() - t0:.3f}")
        return
    from steer_train.sft import pack

    repeats = repeats or (1 if quick else 3)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by every child, both sides alike
    py = sys.executable
    child = [py, "-m", "bench.training", "--child"]
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        work = Path(tmp)
        base, train, val = prepare(work, quick)
        samples = sft_samples(str(base), str(train))
        blocks, truncated = pack(samples, seq_len)
        tokens = sum(len(ids) for ids, _ in samples)
        packing = tokens / (len(blocks) * seq_len)
        per_block = len(samples) / len(blocks)
        rows, _, _ = rm_rows(str(base), str(train))
        rm_tokens = sum(len(ids) for ids, _ in rows)
        hp_ = {"lr": lr, "warmup": 5, "min_lr_ratio": 0.1, "grad_clip": 1.0, "epochs": epochs, "seed": 0,
               "seq_len": seq_len, "hf_batch": max(1, round(per_block)), "rm_batch": rm_batch}
        common = ["--lr", str(lr), "--warmup", "5", "--min-lr-ratio", "0.1", "--grad-clip", "1.0", "--epochs",
                  str(epochs), "--seed", "0", "--device", "cpu", "--no-progress"]
        val_samples = sft_samples(str(base), str(val))
        losses: dict[str, list[float]] = {}

        def one(r: int) -> dict[str, float]:
            d = work / f"r{r}"
            runs = {
                "sft": [*child, "steer-train", "--", "sft", "--model", str(base), "--data", str(train),
                        "--out", str(d / "sft"), "--seq-len", str(seq_len), *common],
                "hf_sft": [*child, "hf-sft", "--model", str(base), "--data", str(train),
                           "--run-out", str(d / "hf-sft"), "--hp", json.dumps(hp_)],
                "rm": [*child, "steer-train", "--", "rm", "--model", str(base), "--data", str(train),
                       "--out", str(d / "rm"), "--max-length", str(seq_len), "--batch-size", str(rm_batch), *common],
                "hf_rm": [*child, "hf-rm", "--model", str(base), "--data", str(train),
                          "--run-out", str(d / "hf-rm"), "--hp", json.dumps(hp_)],
            }
            figs = {}
            for name, cmd in runs.items():
                figs[f"{name}_s"], figs[f"{name}_loop_s"] = run_timed(cmd)
            for name, path in (("sft", d / "sft"), ("hf_sft", d / "hf-sft")):
                losses.setdefault(name, []).append(heldout_sft_loss(str(path), val_samples))
            for name, path in (("rm", d / "rm"), ("hf_rm", d / "hf-rm")):
                losses.setdefault(name, []).append(heldout_rm_mse(str(path), str(val)))
            click.echo(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v:.2f}" for k, v in figs.items())
                       + "; held-out " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in losses.items()), err=True)
            return figs

        raw = repeat(one, repeats)
        profiles = {}
        if statistics.median(ratios(raw["hf_sft_loop_s"], raw["sft_loop_s"])) < SFT_TARGET:
            click.echo(f"  steer_train sft under {SFT_TARGET}x Trainer; profiling one run of each", err=True)
            profiles["steer_train sft"] = run_profiled(
                [*child, "steer-train-profile", "--", "sft", "--model", str(base), "--data", str(train),
                 "--out", str(work / "profile"), "--seq-len", str(seq_len), *common])
            profiles["Trainer"] = run_profiled([*child, "hf-sft-profile", "--model", str(base), "--data", str(train),
                                                "--run-out", str(work / "hf-profile"), "--hp", json.dumps(hp_)])
    # tokens/s ratio = inverse time ratio: both sides process the same real tokens.
    metrics = {
        "sft_train_tokens_per_s_vs_trainer": summarize(ratios(raw["hf_sft_loop_s"], raw["sft_loop_s"])),
        "rm_train_tokens_per_s_vs_trainer": summarize(ratios(raw["hf_rm_loop_s"], raw["rm_loop_s"])),
        "sft_tokens_per_s_vs_trainer": summarize(ratios(raw["hf_sft_s"], raw["sft_s"])),
        "rm_tokens_per_s_vs_trainer": summarize(ratios(raw["hf_rm_s"], raw["rm_s"])),
        "sft_heldout_loss_vs_trainer": summarize(ratios(losses["sft"], losses["hf_sft"]), better="lower"),
        "rm_heldout_mse_vs_trainer": summarize(ratios(losses["rm"], losses["hf_rm"]), better="lower"),
        "sft_packing_efficiency": summarize([packing], unit="share"),
    }
    loss = {k: summarize(v, unit="loss", better="lower") for k, v in losses.items()}

    def tps(n_tokens: int, seconds: list[float]) -> str:
        return f"{summarize([epochs * n_tokens / s for s in seconds])['median']:.0f}"

    rows_md = [
        ["SFT (`steer_train sft`, packed)", fmt(metrics["sft_train_tokens_per_s_vs_trainer"]),
         tps(tokens, raw["sft_loop_s"]), fmt(metrics["sft_tokens_per_s_vs_trainer"]), tps(tokens, raw["sft_s"]),
         fmt(loss["sft"], 4), fmt(loss["hf_sft"], 4), fmt(metrics["sft_heldout_loss_vs_trainer"], 3)],
        ["RM (`steer_train rm`)", fmt(metrics["rm_train_tokens_per_s_vs_trainer"]), tps(rm_tokens, raw["rm_loop_s"]),
         fmt(metrics["rm_tokens_per_s_vs_trainer"]), tps(rm_tokens, raw["rm_s"]),
         fmt(loss["rm"], 4), fmt(loss["hf_rm"], 4), fmt(metrics["rm_heldout_mse_vs_trainer"], 3)],
    ]
    md = (f"## Training (steer_train sft / rm vs transformers Trainer, CPU)\n\n"
          f"{len(samples)} conversations ({tokens} real tokens, {len(rows)} rated turns), seq len {seq_len}, "
          f"{epochs:g} epoch(s), LR {lr:g}, warm-up 5, cosine to 0.1x, clip 1.0, fused AdamW both; SFT: "
          f"{len(blocks)} packed blocks, one per step, against Trainer batches of {hp_['hf_batch']} padded "
          f"conversations ({math.ceil(len(samples) / hp_['hf_batch'])} steps); RM batch {rm_batch} both. "
          "tokens/s = real (non-pad) tokens x epochs / seconds, the same count for both sides. Training loop: "
          "steer_train's logged loop time against the `trainer.train()` call; whole command: after the imports, "
          f"data, load, train, save. Torch threads per run: {threads or 'torch default'}. Median (min-max) over "
          f"{repeats} repeat(s), each repeat running every side "
          "one after the other. Held-out: SFT token-mean CE on the answer tokens, RM masked MSE, same function "
          "for both.\n\n"
          + table(["run", "training loop tokens/s vs Trainer", "loop tokens/s (this machine)",
                   "whole command vs Trainer", "command tokens/s", "held-out loss", "Trainer held-out loss",
                   "loss ratio"], rows_md)
          + f"\n\nPacking efficiency (non-pad share of SFT blocks): {packing:.3f} ({len(blocks)} blocks of {seq_len}, "
            f"{truncated} truncated; target >= {PACKING_TARGET}). Target SFT training tokens/s >= {SFT_TARGET}x "
            "Trainer at equal loss.")
    for name, prof in profiles.items():
        md += (f"\n\n`steer_train sft` is under {SFT_TARGET}x the Trainer; torch.profiler over one {name} run, "
               f"top operators by self CPU time:\n\n```\n{prof}\n```")
    record("training", command=command_line("bench/training.py"), info=machine(), metrics=metrics, markdown=md,
           extra={"heldout": loss, "tokens": tokens, "blocks": len(blocks), "hp": hp_, "seconds": raw}, out=out)


if __name__ == "__main__":
    main()
