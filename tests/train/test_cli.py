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


@pytest.mark.parametrize(("command", "config"), [("rm", "RMConfig"), ("sft", "SFTConfig"), ("bootstrap", "SFTConfig")])
def test_training_defaults_come_from_the_config_dataclass(command, config):
    """Each training default lives once, on its config field: the command offers every field that has help,
    with that field's default and help, and its other options have no default of their own for a config field."""
    import dataclasses

    import steer_train.config as configs

    cls = getattr(configs, config)
    params = {p.name: p for p in cli.commands[command].params}
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        assert f.name in params, f"--{f.name.replace('_', '-')} missing from {command}"
        assert params[f.name].default == f.default, f.name
        assert params[f.name].help == f.metadata["help"], f.name


def test_a_setting_given_on_the_command_line_reaches_the_config(tmp_path, monkeypatch):
    import steer_train.rm

    seen = {}
    monkeypatch.setattr(steer_train.rm, "train", lambda cfg: seen.setdefault("cfg", cfg))
    data = tmp_path / "d.jsonl"
    data.write_text("")
    res = CliRunner().invoke(cli, ["rm", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o"),
                                   "--head-lr", "0.5", "--no-progress", "--pooling", "mean"])
    assert res.exit_code == 0, res.output
    from steer_train.config import RMConfig

    cfg = seen["cfg"]
    assert (cfg.head_lr, cfg.progress, cfg.pooling) == (0.5, False, "mean")
    assert cfg.lr == RMConfig(model="", data="", out="").lr  # untouched settings keep the field's default
