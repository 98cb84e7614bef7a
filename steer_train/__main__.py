"""`python -m steer_train COMMAND`: the SteerLM training steps and helpers."""

from __future__ import annotations

import click

from steer_train import cli_train
from steerlm.schema import PRESETS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train SteerLM models: prepare data, train the attribute (reward) model, annotate, SFT, bootstrap.

    Evaluation and the demo are `python -m steer_eval eval|rm-eval|demo`."""


@cli.command("init-tiny")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the checkpoint to.")
@click.option("--schema", "preset", default="helpsteer", show_default=True, type=click.Choice(sorted(PRESETS)),
              help="Attribute set: helpsteer (9 attributes, 0..4) or steerlm-13b (7 attributes, 0..9).")
@click.option("--hidden-size", default=64, show_default=True, help="Model width.")
@click.option("--layers", default=2, show_default=True, help="Number of transformer layers.")
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
def init_tiny_cmd(out: str, preset: str, hidden_size: int, layers: int, seed: int) -> None:
    """Write a tiny random SteerLM checkpoint (tokenizer with control tokens, Llama weights, schema)."""
    from steer_train.tiny import init_tiny
    from steerlm.spec import SteerSpec

    path = init_tiny(out, SteerSpec.preset(preset), hidden_size=hidden_size, layers=layers, seed=seed)
    click.echo(f"wrote tiny SteerLM checkpoint to {path}")


for command in cli_train.COMMANDS:
    cli.add_command(command)


def _moved(name: str) -> click.Command:
    """`python -m steer_train NAME ...` of earlier releases: says where the command lives now and runs it there."""

    @click.command(name, add_help_option=False, help=f"Moved: runs `python -m steer_eval {name}` (same options).",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.pass_context
    def forward(ctx: click.Context) -> None:
        from steer_eval.__main__ import cli as eval_cli

        click.echo(f"note: `python -m steer_train {name}` is now `python -m steer_eval {name}`", err=True)
        target = eval_cli.commands[name]
        with target.make_context(f"python -m steer_eval {name}", list(ctx.args)) as sub:
            target.invoke(sub)

    return forward


for name in ("eval", "rm-eval", "demo"):
    cli.add_command(_moved(name))

if __name__ == "__main__":
    cli()
