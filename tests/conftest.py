"""Shared fixtures: tiny checkpoints made by the tests themselves."""

from __future__ import annotations

import pathlib

import pytest



@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    """A tiny random SteerLM checkpoint (HelpSteer schema, GQA Llama), shared read-only by all tests."""
    from steer_train.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_13b(tmp_path_factory) -> pathlib.Path:
    """A tiny checkpoint carrying the 7-attribute 0..9 schema of the first SteerLM 13B model."""
    from steerlm.spec import SteerSpec
    from steer_train.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny13b") / "model", SteerSpec.preset("steerlm-13b"))
