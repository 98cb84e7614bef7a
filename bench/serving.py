"""Serving overhead: the engine in-process (the floor) against the Triton ensemble and the OpenAI-compatible API.

One model (the tiny test model), one question rendered by the server's own template (fixed input length), a
fixed number of generated tokens, greedy; at concurrency 1, 8 and 32:
- floor:  steerlm.generation.Engine in this process, streaming through GenerationRequest.emit;
- triton: the `steerlm` ensemble on a real tritonserver (steerlm.serve.triton.TritonServer), streamed over
          gRPC by steerlm_client (what users call);
- openai: the OpenAI-compatible HTTP API (steerlm.api, started by `make serve`), streamed chat completions,
          when this checkout has it (or --openai-url points at one);
- echo:   Triton's own cost: an ensemble of two empty python models (bench/echo_models; the `steerlm`
          ensemble's shape) that streams one-character responses: what any python-backend ensemble pays;
- aiperf: NVIDIA's load generator (pinned in requirements-aiperf.txt, its own venv .venv-bench) against the
          OpenAI endpoint and, through its template endpoint, Triton's /v2/models/steerlm/generate_stream.
Per run: time to first token (TTFT), inter-token latency (ITL: per request (last arrival - first) / (tokens - 1),
as aiperf defines it, so pieces that arrive in bursts do not read as 0 ms), requests/s, tokens/s. The serving
overhead is reported per request (TTFT - floor TTFT, and the ratio) and per token (ITL / floor ITL), each repeat
against the floor of the same repeat. Both engines admit the same number of rows (the rendered repository's
max_batch_size is the floor's). Per-token flatness: one long stream; mean inter-arrival over its last 50 pieces / over pieces
10-60 (windows, not single intervals: one late piece on a busy machine is not a trend).
The ensemble's min_tokens (when the ensemble has it) pins the output length; without it a request may end early
at the end id, and token counts are what was actually streamed.

    .venv/bin/python -m bench.serving [--quick] [--repeats 3] [--openai-url http://127.0.0.1:9000]
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click

from bench.common import (
    command_line,
    fmt,
    machine,
    not_available,
    out_option,
    passive_omp,
    ratios,
    record,
    repeat,
    summarize,
    table,
)

ROOT = Path(__file__).resolve().parents[1]

QUESTION = "Explain how a neural network learns from data, step by step."
CONCURRENCY = (1, 8, 32)
AIPERF = ROOT / ".venv-bench" / "bin" / "aiperf"
REQUEST_OVERHEAD_TARGET_MS, FLATNESS_TARGET = 1.0, 1.5


@dataclass
class Trace:
    """Arrival times (perf_counter seconds) of one streamed request."""
    start: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def itl(self) -> float | None:
        """Mean time per token after the first (aiperf's inter_token_latency), None for a one-token answer."""
        return (self.arrivals[-1] - self.arrivals[0]) / (self.tokens - 1) if self.tokens > 1 else None


def aggregate(traces: list[Trace], wall: float) -> dict[str, float]:
    itls = [t.itl for t in traces if t.itl is not None]
    return {"ttft_ms": 1000 * statistics.median(t.ttft for t in traces),
            "itl_ms": 1000 * statistics.median(itls) if itls else float("nan"),
            "req_s": len(traces) / wall, "tok_s": sum(t.tokens for t in traces) / wall}


def run_load(one_request, n: int, concurrency: int) -> dict[str, float]:
    """n requests, at most `concurrency` in flight, each a callable returning its Trace."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        traces = list(pool.map(lambda _: one_request(), range(n)))
    return aggregate(traces, time.perf_counter() - t0)


# ---------------------------------------------------------------- the three clients


def floor_request(engine, prompt_ids: list[int], max_tokens: int) -> Trace:
    from steerlm.generation import GenerationRequest, SamplingParams

    trace, done, errors = Trace(time.perf_counter()), threading.Event(), []

    def emit(tokens: list[int], final: bool) -> None:
        if tokens:
            trace.arrivals.append(time.perf_counter())
            trace.tokens += len(tokens)
        if final:
            done.set()

    def fail(msg: str) -> None:
        errors.append(msg)
        done.set()

    engine.submit(GenerationRequest(prompt_ids, SamplingParams(max_tokens=max_tokens), emit, stream=True, fail=fail))
    done.wait(600)
    if errors or not trace.arrivals:
        raise RuntimeError(f"engine request failed: {errors or 'no tokens'}")
    return trace


def triton_request(client, max_tokens: int, min_tokens: bool) -> Trace:
    # steerlm_client.stream() takes the public keyword arguments; min_tokens only once the ensemble has it.
    kwargs = {"max_tokens": max_tokens, **({"min_tokens": max_tokens} if min_tokens else {})}
    trace = Trace(time.perf_counter())
    for _piece in client.stream(QUESTION, **kwargs):
        trace.arrivals.append(time.perf_counter())
        trace.tokens += 1
    if not trace.arrivals:
        raise RuntimeError("the ensemble streamed nothing")
    if min_tokens:  # pieces are text (a piece may hold several tokens); min_tokens pins the token count
        trace.tokens = max_tokens
    return trace


def echo_request(url: str, tokens: int) -> Trace:
    """The echo baseline: the ensemble of two empty python models streams `tokens` one-character responses
    (a gRPC connection per request, as steerlm_client makes)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    trace, results = Trace(time.perf_counter()), queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for name, arr, dtype in (("text_input", np.array([[QUESTION.encode()]], dtype=np.object_), "BYTES"),
                             ("max_tokens", np.array([[tokens]], dtype=np.int32), "INT32")):
        inputs.append(grpcclient.InferInput(name, list(arr.shape), dtype))
        inputs[-1].set_data_from_numpy(arr)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("echo", inputs)
        while trace.tokens < tokens:
            result, error = results.get(timeout=600)
            if error is not None:
                raise RuntimeError(f"echo failed: {error}")
            trace.arrivals.append(time.perf_counter())
            trace.tokens += 1
    finally:
        client.stop_stream()
        client.close()
    return trace


def openai_request(url: str, model: str, max_tokens: int) -> Trace:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
                       "min_tokens": max_tokens, "stream": True, "temperature": 0}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    trace = Trace(time.perf_counter())
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            delta = json.loads(line[5:])["choices"][0].get("delta", {}).get("content")
            if delta:
                trace.arrivals.append(time.perf_counter())
                trace.tokens += 1
    if not trace.arrivals:
        raise RuntimeError("the OpenAI endpoint streamed nothing")
    trace.tokens = max_tokens  # min_tokens pins the count (the API refuses it where the ensemble lacks it)
    return trace


# ---------------------------------------------------------------- aiperf


AIPERF_TRITON_TEMPLATE = ('{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "stream": true'
                          '{% if min_tokens %}, "min_tokens": {{ max_tokens }}{% endif %}}')


def aiperf_profile(kind: str, url: str, model_dir: Path, concurrency: int, n: int, isl: int, osl: int,
                   artifacts: Path, min_tokens: bool) -> dict[str, float]:
    """Run `aiperf profile` once; TTFT/ITL p50 (ms), request and output-token throughput."""
    cmd = [str(AIPERF), "profile", "--model", "steerlm", "--tokenizer", str(model_dir), "--url", url,
           "--streaming", "--concurrency", str(concurrency), "--request-count", str(n),
           "--synthetic-input-tokens-mean", str(isl), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(osl), "--output-tokens-stddev", "0", "--random-seed", "0",
           "--artifact-dir", str(artifacts), "--ui-type", "none"]
    if kind == "openai":
        cmd += ["--endpoint-type", "chat", "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{osl}"]
    else:
        # A file: --extra-inputs splits an inline template at its commas.
        template = artifacts.with_suffix(".jinja")
        template.write_text(AIPERF_TRITON_TEMPLATE.replace("{% if min_tokens %}", "{% if true %}" if min_tokens
                                                           else "{% if false %}"))
        cmd += ["--endpoint-type", "template", "--custom-endpoint", "/v2/models/steerlm/generate_stream",
                "--extra-inputs", f"payload_template:{template}", "--extra-inputs", "response_field:text_output"]
    # Not HF_HUB_OFFLINE: aiperf 0.13 then looks a local tokenizer directory up as a hub repo id and fails;
    # a local directory is loaded from disk without it.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    export = artifacts / "profile_export_aiperf.json"
    if proc.returncode != 0 or not export.exists():
        raise RuntimeError(f"aiperf failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(export.read_text())
    return {"ttft_ms": aiperf_stat(data, "time_to_first_token", "p50"),
            "itl_ms": aiperf_stat(data, "inter_token_latency", "p50"),
            "req_s": aiperf_stat(data, "request_throughput", "avg"),
            "tok_s": aiperf_stat(data, "output_token_throughput", "avg")}


def aiperf_stat(data, tag: str, stat: str) -> float:
    """A statistic of one metric from profile_export_aiperf.json (found wherever the export nests it)."""
    if isinstance(data, dict):
        if tag in data and isinstance(data[tag], dict) and stat in data[tag]:
            return float(data[tag][stat])
        for value in data.values():
            try:
                return aiperf_stat(value, tag, stat)
            except KeyError:
                pass
    elif isinstance(data, list):
        for value in data:
            try:
                return aiperf_stat(value, tag, stat)
            except KeyError:
                pass
    raise KeyError(f"{tag}.{stat} not in the aiperf export")


# ---------------------------------------------------------------- helpers


def ensemble_has(server, name: str) -> bool:
    """Whether the rendered `steerlm` ensemble declares an input of this name (e.g. min_tokens)."""
    return any(f'"{name}"' in p.read_text() for p in Path(server.repo_dir).glob("steerlm/config.pbtxt"))


FLAT_WINDOW = 50


def flatness(trace: Trace) -> float:
    """Mean inter-arrival over the last 50 pieces / over pieces 10..60 (1.0: the 1000th token costs the 10th's).
    Windows of 50: a single interval on a shared machine is noise, and pieces may arrive in bursts."""
    a = trace.arrivals
    w = min(FLAT_WINDOW, (len(a) - 10) // 3)
    if w < 10:
        raise ValueError(f"a flatness run needs >= 40 pieces, got {len(a)}")
    return (a[-1] - a[-1 - w]) / (a[10 + w] - a[10])


@contextmanager
def openai_api(openai_url: str | None, model_dir: Path, grpc_url: str) -> Iterator[str]:
    """The OpenAI endpoint to measure: the one given, else `python -m steerlm.api` in its own process (as
    `make serve` runs it beside Triton), so it does not share this process's interpreter with the load."""
    if openai_url:
        yield openai_url
        return
    from steerlm.serve.triton import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "steerlm.api", "--model", str(model_dir), "--triton-grpc", grpc_url,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the API did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="8 requests per level, 16 tokens, a 200-token flatness stream, 1 repeat.")
@click.option("--repeats", type=int, default=None, help="Repeats (default 3, 1 with --quick).")
@click.option("--output-len", "osl", type=int, default=None, help="Generated tokens per request (default 64; 16 quick).")
@click.option("--long-len", type=int, default=None, help="Tokens of the flatness stream (default 1000; 200 quick).")
@click.option("--openai-url", default=None, help="An OpenAI-compatible server to measure (default: `python -m steerlm.api` started here).")
@click.option("--openai-model", default="steerlm", show_default=True, help="Model name the OpenAI server expects.")
@click.option("--aiperf/--no-aiperf", "use_aiperf", default=True, show_default=True,
              help="Also measure with aiperf (needs .venv-bench, made by `make bench`).")
@out_option
def main(quick, repeats, osl, long_len, openai_url, openai_model, use_aiperf, out) -> None:
    """TTFT, ITL, req/s and tok/s at concurrency 1/8/32: engine in-process vs Triton ensemble vs OpenAI API."""
    passive_omp()  # before torch is imported
    from bench.serving_stages import add_echo_models
    from steer_train.tiny import init_tiny
    from steerlm.generation import Engine
    from steerlm.serve.repository import render_repository
    from steerlm.serve.triton import TritonServer
    from steerlm.tokenize import load_tokenizer
    from steerlm_client import SteerClient

    repeats = repeats or (1 if quick else 3)
    osl = osl or (16 if quick else 64)
    long_len = long_len or (200 if quick else 1000)
    aiperf_why = None if AIPERF.exists() else "aiperf is not installed (.venv-bench; `make bench` installs it)"
    if not use_aiperf:
        aiperf_why = "--no-aiperf"
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        model_dir = init_tiny(work / "model", max_positions=long_len + 512)
        # The generator's engine admits as many rows as the floor's (the CPU default, 8, would queue the rest).
        repo = render_repository(work / "repo", model_dir, backend="cpu", max_batch_size=max(CONCURRENCY))
        add_echo_models(repo)
        with TritonServer(repo_dir=repo, workdir=work / "triton", timeout=300) as server, \
                openai_api(openai_url, model_dir, server.grpc_url) as openai_url:
            client = SteerClient(server.grpc_url, "grpc")
            min_tokens = ensemble_has(server, "min_tokens")
            prompt = client.complete(QUESTION, max_tokens=1).prompt
            prompt_ids = load_tokenizer(model_dir).encode(prompt).ids
            isl = len(prompt_ids)
            engine = Engine(model_dir, max_batch_size=max(CONCURRENCY))
            try:
                floor_request(engine, prompt_ids, 2)  # warm-up
                triton_request(client, 2, min_tokens)
                echo_request(server.grpc_url, 2)
                levels = CONCURRENCY

                def one(r: int) -> dict[str, float]:
                    figs: dict[str, float] = {}
                    for c in levels:
                        n = max(8 if quick else 16, c)
                        for kind, fn in (("floor", lambda: floor_request(engine, prompt_ids, osl)),
                                         ("triton", lambda: triton_request(client, osl, min_tokens)),
                                         ("openai", lambda: openai_request(openai_url, openai_model, osl)),
                                         ("echo", lambda: echo_request(server.grpc_url, osl))):
                            for k, v in run_load(fn, n, c).items():
                                figs[f"{kind}_c{c}_{k}"] = v
                        if aiperf_why is None:
                            targets = [("aiperf_triton", f"http://{server.http_url}"), ("aiperf_openai", openai_url)]
                            for kind, url in targets:
                                res = aiperf_profile(kind.split("_")[1], url, model_dir, c, n, isl, osl,
                                                     work / f"aiperf-{kind}-{r}-{c}", min_tokens)
                                for k, v in res.items():
                                    figs[f"{kind}_c{c}_{k}"] = v
                    # The long streams start on a settled server (a pause, one short request): on a loaded machine
                    # a stream's first pieces sometimes arrived together after 0.1-0.2 s, before and after the
                    # changes of issue 13 alike, which an early window reads as a per-token trend
                    # (bench/serving_stages.py --long times the per-response stages themselves).
                    time.sleep(1.0)
                    triton_request(client, 2, min_tokens)
                    figs["floor_flatness"] = flatness(floor_request(engine, prompt_ids, long_len))
                    long = triton_request(client, long_len, min_tokens)
                    figs["triton_flatness"] = flatness(long)
                    figs["triton_flatness_pieces"] = long.tokens
                    click.echo(f"  repeat {r + 1}/{repeats}: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in figs.items() if "_c1_" in k or "flatness" in k), err=True)
                    return figs

                raw = repeat(one, repeats)
            finally:
                engine.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    kinds = ["triton", "openai"]
    kinds += [k for k in ("aiperf_triton", "aiperf_openai") if f"{k}_c1_ttft_ms" in raw]
    metrics, rows = {}, []
    for c in CONCURRENCY:
        f = {k: raw[f"floor_c{c}_{k}"] for k in ("ttft_ms", "itl_ms", "req_s", "tok_s")}
        rows.append(["floor (engine in-process)", c, fmt(summarize(f["ttft_ms"]), 1), fmt(summarize(f["itl_ms"]), 2),
                     fmt(summarize(f["req_s"])), fmt(summarize(f["tok_s"]), 0), "1", "1", "0"])
        for kind in kinds:
            s = {k: raw[f"{kind}_c{c}_{k}"] for k in ("ttft_ms", "itl_ms", "req_s", "tok_s")}
            ttft_ratio = summarize(ratios(s["ttft_ms"], f["ttft_ms"]), better="lower")
            itl_ratio = summarize(ratios(s["itl_ms"], f["itl_ms"]), better="lower")
            tok_ratio = summarize(ratios(s["tok_s"], f["tok_s"]))
            extra_ms = summarize([a - b for a, b in zip(s["ttft_ms"], f["ttft_ms"])], unit="ms", better="lower")
            metrics.update({f"{kind}_c{c}/ttft_vs_floor": ttft_ratio, f"{kind}_c{c}/itl_vs_floor": itl_ratio,
                            f"{kind}_c{c}/tok_s_vs_floor": tok_ratio, f"{kind}_c{c}/ttft_minus_floor_ms": extra_ms})
            rows.append([kind, c, fmt(summarize(s["ttft_ms"]), 1), fmt(summarize(s["itl_ms"]), 2),
                         fmt(summarize(s["req_s"])), fmt(summarize(s["tok_s"]), 0), fmt(ttft_ratio), fmt(itl_ratio),
                         fmt(extra_ms, 1)])
        if aiperf_why:
            rows.append(["aiperf", c, aiperf_why, "", "", "", "", "", ""])
        e = {k: raw[f"echo_c{c}_{k}"] for k in ("ttft_ms", "itl_ms")}
        echo_ttft = summarize(e["ttft_ms"], unit="ms", better="lower")
        metrics[f"echo_c{c}/ttft_ms"] = echo_ttft
        ours_cell = ""
        if c == 1:
            # What is ours: the ensemble's TTFT over the floor's, less what the empty ensemble alone takes. Only
            # alone: under load the echo's back-to-back responses queue in this Python client instead.
            ours = summarize([t - f_ - x for t, f_, x in zip(raw[f"triton_c{c}_ttft_ms"], f["ttft_ms"],
                                                              e["ttft_ms"])], unit="ms", better="lower")
            metrics[f"triton_c{c}/ttft_minus_floor_minus_echo_ms"] = ours
            ours_cell = f"ours: {fmt(ours, 1)}"
        rows.append(["echo (2 empty python models, Triton's own cost)", c, fmt(echo_ttft, 1),
                     fmt(summarize(e["itl_ms"]), 2), "", "", "", "", ours_cell])
    for kind in ("floor", "triton"):
        metrics[f"{kind}/flatness_last50_vs_10to60"] = summarize(raw[f"{kind}_flatness"], better="lower")
    md = (f"## Serving overhead (tiny model, CPU backend)\n\n"
          f"Prompt of {isl} tokens (the server's rendering of one question), {osl} generated tokens, greedy; "
          f"{'min_tokens pins the length' if min_tokens else 'no min_tokens in this ensemble: a request may end early at the end id'}; "
          f"requests per level max(16, concurrency); median (min-max) over {repeats} repeat(s). TTFT/ITL: medians over "
          "requests (aiperf: p50); ratios per repeat against the floor of the same repeat.\n\n"
          + table(["path", "concurrency", "TTFT ms", "ITL ms", "req/s", "tok/s",
                   "TTFT / floor", "ITL / floor",
                   "TTFT - floor (ms)"], rows)
          + "\n\nThe echo rows: the same two-step ensemble shape with empty python models (bench/echo_models), so its "
            "TTFT is what Triton's gRPC frontend, ensemble scheduler and two python-backend hops cost by themselves; "
            "'ours' = ensemble TTFT - floor TTFT - echo TTFT, per repeat, at concurrency 1 (under load the echo's "
            "back-to-back responses queue in this script's Python client, so its TTFT is no longer Triton's alone). "
            f"Per-token flatness, one {long_len}-token stream, mean inter-arrival over the last {FLAT_WINDOW} pieces / "
            f"over pieces 10-{10 + FLAT_WINDOW} (target <= {FLATNESS_TARGET}): floor "
            f"{fmt(metrics['floor/flatness_last50_vs_10to60'])}, Triton ensemble "
            f"{fmt(metrics['triton/flatness_last50_vs_10to60'])} over "
            f"{summarize(raw['triton_flatness_pieces'])['median']:.0f} streamed text pieces (a piece is released once "
            "it decodes stably and cannot be part of a stop string). "
            f"Target: the serving stack adds < {REQUEST_OVERHEAD_TARGET_MS} ms per request at p50.")
    extra = {"input_len": isl, "output_len": osl, "min_tokens": min_tokens, "long_len": long_len}
    if aiperf_why:
        extra["aiperf"] = not_available("aiperf", aiperf_why)
    record("serving", command=command_line("bench/serving.py"), info=machine(), metrics=metrics, markdown=md,
           extra=extra, out=out)


if __name__ == "__main__":
    main()
