"""steerlm_client keeps its gRPC connections between calls (opening one costs milliseconds per request, as
bench/serving_stages.py measured), but never reuses one whose stream did not end cleanly."""

from __future__ import annotations

import gc

from steerlm_client import SteerClient


def test_a_finished_call_leaves_its_connection_for_the_next(server):
    with SteerClient(server.grpc_url, "grpc") as client:
        first = client.generate("Hi", max_tokens=2)
        assert len(client._idle) == 1
        kept = client._idle[0]
        assert client.generate("Hi", max_tokens=2) == first
        assert client._idle == [kept]
    assert client._idle == []  # closed on leaving the block


def test_a_stream_abandoned_early_closes_its_connection(server):
    client = SteerClient(server.grpc_url, "grpc")
    answer = client.stream("Tell me a long story.", max_tokens=64, min_tokens=64)
    pieces = iter(answer)
    assert next(pieces) is not None
    del pieces, answer
    gc.collect()
    assert client._idle == []
    assert client.generate("Hi", max_tokens=2)  # the next call opens a new one
    client.close()
