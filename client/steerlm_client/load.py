"""Mixed load against a SteerLM server: many concurrent clients, gRPC and HTTP, streamed and whole.

Every answer is greedy, so all answers to one question must be the same text whichever way they were asked;
a request that errors or gets no final answer within the timeout counts as lost.

    python -m steerlm_client.load --grpc localhost:8001 --http localhost:8000 -n 1000 -c 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from steerlm_client.client import SteerClient, SteerError

MODES = [("grpc", True), ("http", False), ("grpc", False), ("http", True)]


@dataclass
class LoadReport:
    requests: int
    lost: int
    mismatched: int  # answers that differ from another answer to the same question
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def summary(self) -> dict:
        return {"requests": self.requests, "lost": self.lost, "mismatched": self.mismatched,
                "p50_s": round(self.percentile(50), 3), "p99_s": round(self.percentile(99), 3),
                "mean_s": round(statistics.fmean(self.latencies), 3) if self.latencies else None,
                "first_errors": self.errors[:5]}


def run_load(grpc_url: str, http_url: str, requests: int = 1000, concurrency: int = 32, max_tokens: int = 16,
             questions: int = 24, timeout: float = 120.0, model: str = "steerlm") -> LoadReport:
    """Send `requests` requests from `concurrency` threads, cycling through the four transport/stream modes."""
    clients = {p: SteerClient(grpc_url if p == "grpc" else http_url, p, model=model, timeout=timeout)
               for p in ("grpc", "http")}
    answers: dict[int, list[tuple[int, str]]] = defaultdict(list)
    report = LoadReport(requests, 0, 0)
    lock = threading.Lock()

    def one(i: int) -> None:
        protocol, stream = MODES[i % len(MODES)]
        q = i % questions
        question = f"Question {q}: what is the story behind topic number {q * 7}?"
        start = time.monotonic()
        try:
            client = clients[protocol]
            if stream:
                text = "".join(client.stream(question, max_tokens=max_tokens))
            else:
                text = client.generate(question, max_tokens=max_tokens)
        except (SteerError, OSError) as exc:
            with lock:
                report.lost += 1
                report.errors.append(f"#{i} {protocol} stream={stream}: {exc}")
            return
        with lock:
            report.latencies.append(time.monotonic() - start)
            answers[q].append((i, text))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    for q, got in answers.items():
        texts = {t for _, t in got}
        if len(texts) > 1:
            # Count the answers that differ from the most common one.
            common = max(texts, key=lambda t: sum(1 for _, x in got if x == t))
            report.mismatched += sum(1 for _, t in got if t != common)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc", default="localhost:8001", help="gRPC host:port")
    parser.add_argument("--http", default="localhost:8000", help="HTTP host:port")
    parser.add_argument("-n", "--requests", type=int, default=1000, help="requests in all")
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it is lost")
    parser.add_argument("--model", default="steerlm")
    args = parser.parse_args(argv)
    start = time.monotonic()
    report = run_load(args.grpc, args.http, args.requests, args.concurrency, args.max_tokens, timeout=args.timeout,
                      model=args.model)
    print(json.dumps(report.summary() | {"wall_s": round(time.monotonic() - start, 1)}, indent=2))
    return 0 if report.lost == 0 and report.mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
