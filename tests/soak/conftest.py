"""A real tritonserver and the HTTP API in front of it, for the soak harness (its own, so that faults and the
shared serving fixtures never meet)."""

from __future__ import annotations

import pytest

from steerlm.api import ApiServer
from steerlm.serve import TritonServer


@pytest.fixture(scope="module")
def urls(tiny_model):
    with TritonServer(tiny_model) as srv, ApiServer(tiny_model, srv.grpc_url) as api:
        yield {"grpc": srv.grpc_url, "http": srv.http_url, "api": api.url.split("//", 1)[1].rstrip("/")}
