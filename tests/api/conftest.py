"""A real tritonserver on loopback per schema and the HTTP API in front of it, with the official clients."""

from __future__ import annotations

import pytest

from steerlm.api import ApiServer
from steerlm.serve import TritonServer
from steerlm_client import SteerClient


@pytest.fixture(scope="session")
def triton(tiny_model):
    with TritonServer(tiny_model) as srv:
        yield srv


@pytest.fixture(scope="session")
def api(tiny_model, triton):
    with ApiServer(tiny_model, triton.grpc_url) as server:
        yield server


@pytest.fixture
def openai_client(api):
    from openai import OpenAI

    return OpenAI(base_url=api.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def ensemble(triton) -> SteerClient:
    """The ensemble itself, for answers to compare the API's with."""
    return SteerClient(triton.grpc_url, "grpc")


@pytest.fixture(scope="session")
def triton_13b(tiny_model_13b):
    with TritonServer(tiny_model_13b) as srv:
        yield srv


@pytest.fixture(scope="session")
def api_13b(tiny_model_13b, triton_13b):
    with ApiServer(tiny_model_13b, triton_13b.grpc_url) as server:
        yield server
