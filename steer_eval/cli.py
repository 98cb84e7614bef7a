"""The commands of `python -m steer_eval`: eval, rm-eval and demo."""

from __future__ import annotations

from pathlib import Path

import click

from steer_train.quality import rm_table
from steerlm.files import write_atomic, write_json


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("eval")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Generator checkpoint: its steerlm.json gives the attributes and scales; without --server it also generates.")
@click.option("--reward-model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Reward model checkpoint that measures the attributes of every answer.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL of prompts (field question/prompt/text, or MT-Bench turns). Default: the 80 MT-Bench questions.")
@click.option("--attributes", default=None,
              help="Comma-separated attributes to sweep. Default: the model's user-facing ones "
                   "(creativity, complexity, verbosity) that it has, else all.")
@click.option("--values", default=None, help="Comma-separated values to request (default: every value of each scale).")
@click.option("--server", default=None, metavar="HOST:PORT",
              help="Generate through the served `steerlm` ensemble over gRPC instead of in-process.")
@click.option("--max-tokens", default=128, show_default=True, help="Answer length limit in tokens.")
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 decodes greedily.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling threshold (with --temperature > 0).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N prompts.")
@click.option("--concurrency", default=8, show_default=True, help="Requests in flight with --server.")
@click.option("--out", "out_dir", default="runs/eval", show_default=True, type=click.Path(file_okay=False),
              help="Directory for eval.json, eval.md and eval.png.")
def eval_cmd(model, reward_model, prompts, attributes, values, server, max_tokens, temperature, top_p, seed, limit,
             concurrency, out_dir) -> None:
    """Measure how well each attribute steers: sweep it over its scale (others at defaults), generate, score with
    the reward model; report Spearman, MAE, monotonicity and side effects per attribute."""
    from steer_eval import steerability as ev
    from steer_eval.prompts import load_prompts
    from steerlm.reward import load_reward_model
    from steerlm.schema import SchemaError
    from steerlm.spec import load_spec

    spec = load_spec(model)
    try:
        names = ev.choose_attributes(spec.schema, attributes)
        for name in names:
            ev.sweep_values(spec.schema, name, values)
    except SchemaError as exc:
        raise click.BadParameter(str(exc), param_hint="--attributes/--values") from None
    prompt_list = load_prompts(prompts)[:limit]
    _echo(f"loading reward model {reward_model}")
    scorer = load_reward_model(reward_model)
    generator = ev.ServerGenerator(server, concurrency) if server else ev.LocalGenerator(model)
    decoding = ev.Decoding(max_tokens, temperature, top_p, seed)
    try:
        result = ev.steer_eval(prompt_list, spec, scorer, generator, names, values, decoding, progress=_echo)
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from None
    paths = ev.write_eval(result, out_dir, title=Path(model).name)
    click.echo(ev.markdown(result))
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


@click.command("rm-eval")
@click.option("--reward-model", required=True, type=click.Path(exists=True, file_okay=False), help="Reward model checkpoint.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Labelled conversation JSONL (NeMo-Aligner schema, e.g. the validation file of `prepare`).")
@click.option("--batch-size", default=8, show_default=True, help="Conversations scored per forward pass.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Also write rm_eval.json and rm_eval.md here.")
def rm_eval_cmd(reward_model, data, batch_size, out_dir) -> None:
    """Reward-model quality on held-out labelled answers: per-attribute MAE, Pearson r and pairwise accuracy
    (how often the better-labelled of two answers to the same prompt scores higher)."""
    from steer_train.data import DataError, load_jsonl
    from steer_train.quality import rm_eval
    from steerlm.reward import load_reward_model

    scorer = load_reward_model(reward_model)
    try:
        conversations = load_jsonl(data, scorer.spec.schema)
        metrics = rm_eval(scorer, scorer.spec.schema, conversations, batch_size)
    except (DataError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    table = rm_table(metrics)
    click.echo(table)
    if out_dir:
        write_json(Path(out_dir) / "rm_eval.json", metrics)
        write_atomic(Path(out_dir) / "rm_eval.md", table)
        click.echo(f"wrote {Path(out_dir) / 'rm_eval.json'} and rm_eval.md")


@click.command("demo")
@click.option("--work-dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where every stage writes its outputs (and stamps/ records what is up to date).")
@click.option("--force", is_flag=True, help="Run every stage again even when its outputs are up to date.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the train/validation split, the openings, both model initialisations and training "
                   "order; another seed shows how much the figures vary from run to run (use another --work-dir).")
def demo_cmd(work_dir, force, seed) -> None:
    """The whole SteerLM method on CPU in about ten minutes: demo data with weak labels, reward model, annotation,
    attribute-conditioned SFT, TensorRT-LLM checkpoint, Triton serving, one question at two verbosity settings and
    the steerability table. Stages whose inputs did not change are skipped."""
    from steer_eval.demo import DemoConfig, run_demo

    run_demo(Path(work_dir), DemoConfig(seed=seed), force=force)


COMMANDS: list[click.Command] = [eval_cmd, rm_eval_cmd, demo_cmd]
