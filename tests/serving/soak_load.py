"""`make soak`: the mixed load of test_resilience.py, longer (not collected by `make test`: no test_ prefix).

    SOAK_REQUESTS=5000 python -m pytest -q -s tests/serving/soak_load.py
"""

from __future__ import annotations

import os

from steerlm_client.load import run_load


def test_soak_mixed_load_none_lost(server):
    n = int(os.environ.get("SOAK_REQUESTS", "5000"))
    report = run_load(server.grpc_url, server.http_url, requests=n, concurrency=32, max_tokens=32, timeout=300)
    print(report.summary())
    assert report.lost == 0 and report.mismatched == 0 and len(report.latencies) == n
