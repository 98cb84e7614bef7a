"""Every training command is registered on `python -m steer_train` with a help text."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from steer_train.__main__ import cli


@pytest.mark.parametrize("command", ["prepare", "rm", "annotate", "sft", "bootstrap", "import-gguf"])
def test_command_has_help(command):
    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0
    assert "Usage:" in res.output and "--out" in res.output
