"""Click commands registered on `python -m steer_train`."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
