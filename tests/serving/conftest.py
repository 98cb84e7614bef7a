"""One real tritonserver on free loopback ports serving the tiny checkpoint, shared by the serving tests."""

from __future__ import annotations

import pytest

from steerlm.serve import TritonServer
from steerlm_client import SteerClient


@pytest.fixture(scope="session")
def server(tiny_model):
    with TritonServer(tiny_model) as srv:
        yield srv


@pytest.fixture(params=["grpc", "http"])
def client(request, server) -> SteerClient:
    url = server.grpc_url if request.param == "grpc" else server.http_url
    return SteerClient(url, request.param)


@pytest.fixture
def grpc_client(server) -> SteerClient:
    return SteerClient(server.grpc_url, "grpc")
