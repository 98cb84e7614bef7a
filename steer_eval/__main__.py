"""`python -m steer_eval COMMAND`: steerability and reward-model evaluation, and the end-to-end demo."""

from __future__ import annotations

import click

from steer_eval.cli import COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Evaluate SteerLM models (eval, rm-eval) and run the whole method on CPU (demo)."""


for command in COMMANDS:
    cli.add_command(command)

if __name__ == "__main__":
    cli()
