"""Where a streamed request's time goes in `steerlm`, stage by stage, against the in-process engine.

Every process that handles the request (this client, the `steerlm` relay and `generator` python stubs, and the
engine thread inside the generator) appends `request_id stage nanoseconds` lines to its own file, with
CLOCK_MONOTONIC (system-wide on Linux, so the processes' stamps compare). The stubs are instrumented by
replacing the rendered repository's model.py with a wrapper that loads the original and wraps its methods
(nothing in the served code knows about this). The same wrappers time the engine called in-process (the floor).

Baselines beside it, on the same server: `echo`, an ensemble of an empty python model and a decoupled python
model that streams one-character responses from its own thread (bench/echo_models: Triton's own cost for two
python hops), and `echo_stream` called directly (one hop, as Triton reaches the relay; the relay adds the
socket hop to the generator process).

    .venv/bin/python -m bench.serving_stages [--requests 24] [--tokens 16] [--concurrency 1,8]
"""

from __future__ import annotations

import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
ECHO_MODELS = Path(__file__).resolve().parent / "echo_models"
STAGE_LOG = "STEERLM_STAGE_LOG"
QUESTION = "Explain how a neural network learns from data, step by step."

# ---------------------------------------------------------------- stamping (runs in every process)

_state = threading.local()
_files: dict[int, object] = {}


def stamp(rid: str, stage: str, value: int | None = None) -> None:
    """Append one stamp to this process's log (no-op unless STEERLM_STAGE_LOG names a directory)."""
    folder = os.environ.get(STAGE_LOG)
    if not folder:
        return
    pid = os.getpid()
    f = _files.get(pid)
    if f is None:
        f = _files[pid] = open(Path(folder) / f"{pid}.log", "a", buffering=1)
    f.write(f"{rid}\t{stage}\t{time.monotonic_ns() if value is None else value}\n")


def instrument_engine() -> None:
    """Stamp engine intake, each delivered token, and the generator's response sends."""
    from steerlm.generation import Engine
    from steerlm.sampling import GenerationRequest

    submit, admit, deliver = Engine.submit, Engine._admissible, GenerationRequest.deliver

    def staged_submit(self, request):
        request._rid = getattr(_state, "rid", "?")
        request._n = 0
        stamp(request._rid, "eng_submit")
        return submit(self, request)

    def staged_admit(self, req):  # the engine thread takes the request up for its prefill
        stamp(getattr(req, "_rid", "?"), "eng_admit")
        return admit(self, req)

    def staged_deliver(self, tokens, new, final):
        rid = getattr(self, "_rid", "?")
        n = getattr(self, "_n", 0)
        stamp(rid, f"deliver_{n}")
        self._n = n + 1
        deliver(self, tokens, new, final)
        stamp(rid, f"delivered_{n}")

    Engine.submit, Engine._admissible, GenerationRequest.deliver = staged_submit, staged_admit, staged_deliver


def instrument_steerlm(module) -> None:
    """The relay: Triton's execute, request building, the stream's start, and its response sender."""
    from steerlm.serve.ipc import IpcClient
    from steerlm.serve.relay import Relay
    from steerlm.serve.requests import RequestBuilder

    cls, sender_cls = module.TritonPythonModel, module.Sender
    execute, start, build, stream = cls.execute, Relay.start, RequestBuilder.from_inputs, IpcClient.stream
    send, is_cancelled = sender_cls.send, sender_cls.is_cancelled

    def staged_execute(self, requests):
        for r in requests:
            stamp(r.request_id(), "relay_exec")
        return execute(self, requests)

    def staged_start(self, inputs, sender, request_id=""):
        _state.rid = request_id
        sender._rid, sender._n = request_id, 0
        return start(self, inputs, sender, request_id)

    def staged_build(self, inputs, limit):
        out = build(self, inputs, limit)
        stamp(_state.rid, "relay_built")
        return out

    def staged_stream(self, document, signature, request_id=""):
        out = stream(self, document, signature, request_id)
        stamp(request_id, "relay_sent")
        return out

    def staged_send(self, outputs, final, error=None):
        rid, n = getattr(self, "_rid", "?"), getattr(self, "_n", 0)
        self._n = n + 1
        stamp(rid, f"send_{n}")
        send(self, outputs, final, error)
        stamp(rid, f"sent_{n}")
        if final:  # totals of the cancellation polls, as (count, ns) in the place of a time
            stamp(rid, "is_cancelled_calls", getattr(self, "_isc_n", 0))
            stamp(rid, "is_cancelled_ns", getattr(self, "_isc_ns", 0))

    def staged_is_cancelled(self):
        t = time.monotonic_ns()
        out = is_cancelled(self)
        self._isc_ns = getattr(self, "_isc_ns", 0) + time.monotonic_ns() - t
        self._isc_n = getattr(self, "_isc_n", 0) + 1
        return out

    cls.execute, Relay.start, RequestBuilder.from_inputs, IpcClient.stream = (staged_execute, staged_start,
                                                                             staged_build, staged_stream)
    sender_cls.send, sender_cls.is_cancelled = staged_send, staged_is_cancelled


def instrument_generator(module) -> None:
    """The generator: a stream's arrival from the socket, the engine, and each frame it queues."""
    from steerlm.serve import ipc
    from steerlm.serve.generator import GeneratorCore

    instrument_engine()
    core_submit, frame = GeneratorCore.submit, ipc._StreamSink.send

    def staged_core_submit(self, document, signature, sink, request_id=""):
        stamp(request_id, "gen_submit")
        _state.rid = request_id
        sink._rid, sink._n = request_id, 0
        return core_submit(self, document, signature, sink, request_id)

    def staged_frame(self, outputs, final, error=None):
        rid, n = getattr(self, "_rid", "?"), getattr(self, "_n", 0)
        self._n = n + 1
        stamp(rid, f"frame_{n}")
        frame(self, outputs, final, error)

    GeneratorCore.submit, ipc._StreamSink.send = staged_core_submit, staged_frame


WRAPPER = '''"""Stage-timing wrapper (bench/serving_stages.py) around the original model.py of this model."""
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, {root!r})
_spec = importlib.util.spec_from_file_location("steerlm_staged_{name}", Path(__file__).with_name("model_orig.py"))
_orig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_orig)
from bench.serving_stages import instrument_{name}

instrument_{name}(_orig)
TritonPythonModel = _orig.TritonPythonModel
'''


def prepare_repository(repo: Path) -> None:
    """Wrap the steerlm relay and the generator with the stamping code; add the echo baseline models."""
    for name in ("steerlm", "generator"):
        d = repo / name / "1"
        (d / "model.py").rename(d / "model_orig.py")
        (d / "model.py").write_text(WRAPPER.format(root=str(ROOT), name=name))
    add_echo_models(repo)


def add_echo_models(repo: Path) -> None:
    for src in ECHO_MODELS.iterdir():
        if (src / "config.pbtxt").is_file():
            shutil.copytree(src, repo / src.name, dirs_exist_ok=True)
            (repo / src.name / "1").mkdir(exist_ok=True)


# ---------------------------------------------------------------- clients


def grpc_stream(url: str, model: str, fields: dict, rid: str) -> None:
    """One streamed request, as steerlm_client does it (a gRPC connection of its own)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    stamp(rid, "cli_start")
    inputs = []
    for name, value in fields.items():
        dtype = {str: "BYTES", int: "INT32", bool: "BOOL"}[type(value)]
        arr = np.array([[value.encode() if isinstance(value, str) else value]],
                       dtype={"BYTES": np.object_, "INT32": np.int32, "BOOL": bool}[dtype])
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    n = [0]

    def callback(result, error):
        stamp(rid, f"cli_recv_{n[0]}")
        n[0] += 1
        results.put((result, error))

    try:
        client.start_stream(callback=callback)
        client.async_stream_infer(model, inputs, request_id=rid, enable_empty_final_response=True)
        stamp(rid, "cli_sent")
        k = 0
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise RuntimeError(str(error))
            if result.as_numpy("text_output") is not None:
                stamp(rid, f"cli_got_{k}")
                k += 1
            if result.get_response().parameters["triton_final_response"].bool_param:
                return
    finally:
        client.stop_stream()
        client.close()


def floor_stream(engine, prompt_ids: list[int], tokens: int, rid: str) -> None:
    from steerlm.generation import GenerationRequest, SamplingParams

    done = threading.Event()
    k = [0]

    def emit(new, final):
        if new:
            stamp(rid, f"cli_got_{k[0]}")
            k[0] += 1
        if final:
            done.set()

    _state.rid = rid
    stamp(rid, "cli_start")
    engine.submit(GenerationRequest(prompt_ids, SamplingParams(max_tokens=tokens, min_tokens=tokens, end_id=None),
                                    emit, stream=True, fail=lambda m: done.set()))
    done.wait(120)


# ---------------------------------------------------------------- analysis


def read_stamps(folder: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for f in folder.glob("*.log"):
        for line in f.read_text().splitlines():
            rid, stage, ns = line.split("\t")
            out[rid].setdefault(stage, int(ns))
    return out


def med(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def gap(s: dict[str, int], a: str, b: str) -> float | None:
    return (s[b] - s[a]) / 1e6 if a in s and b in s else None


FIRST_TOKEN = [  # (from, to, what)
    ("cli_start", "cli_sent", "client: gRPC client, stream start, request tensors, send"),
    ("cli_sent", "relay_exec", "gRPC -> Triton frontend -> steerlm relay stub (shm IPC)"),
    ("relay_exec", "relay_built", "relay: validation, template, tokenization"),
    ("relay_built", "relay_sent", "relay: JSON document + HMAC, socket connect + send"),
    ("relay_sent", "gen_submit", "socket -> generator connection thread (JSON parse)"),
    ("gen_submit", "eng_submit", "generator: signature check, JSON parse, TextStream, submit"),
    ("eng_submit", "eng_admit", "engine intake (queue -> engine thread picks the request up)"),
    ("eng_admit", "deliver_0", "engine: prefill + first sample"),
    ("deliver_0", "frame_0", "generator: TextStream + response tensors + frame queued"),
    ("frame_0", "send_0", "generator connection thread -> socket -> relay thread -> tensors"),
    ("send_0", "sent_0", "relay: response sender.send (shm IPC to Triton)"),
    ("sent_0", "cli_recv_0", "Triton -> gRPC -> client callback"),
    ("cli_recv_0", "cli_got_0", "client: callback queue -> caller"),
]


# Per-response spans, by the stamp that says response k exists: (label, from stamp, to stamp); {p} is k - 1.
PER_TOKEN = [
    ("deliver_{k}", [("engine step (deliver k-1 -> deliver k)", "deliver_{p}", "deliver_{k}"),
                     ("token callback (deliver -> delivered)", "deliver_{k}", "delivered_{k}")]),
    ("frame_{k}", [("frame queued -> relay's sender.send (socket hop)", "frame_{k}", "send_{k}")]),
    ("sent_{k}", [("response sender.send", "send_{k}", "sent_{k}"),
                  ("sent -> client callback", "sent_{k}", "cli_recv_{k}")]),
    ("cli_got_{k}", [("client inter-arrival (ITL)", "cli_got_{p}", "cli_got_{k}")]),
]


def per_token(s: dict[str, int], kind: str) -> dict[str, list[float]]:
    """Per streamed response after the first: engine step, generator handling, socket hop, sender, transport."""
    out = defaultdict(list)
    for marker, spans in PER_TOKEN:
        k = 1
        while marker.format(k=k) in s:
            for label, a, b in spans:
                out[label].append(gap(s, a.format(k=k, p=k - 1), b.format(k=k, p=k - 1)))
            k += 1
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--requests", "n", type=int, default=24, show_default=True, help="Requests per path and level.")
@click.option("--tokens", type=int, default=16, show_default=True, help="Generated tokens per request.")
@click.option("--concurrency", default="1,8", show_default=True, help="Comma-separated concurrency levels.")
@click.option("--long", "long_len", type=int, default=1000, show_default=True,
              help="Tokens of one more stream (concurrency 1) whose per-response stages are compared early vs late "
                   "(0: none).")
@click.option("--keep", type=click.Path(file_okay=False), default=None, help="Copy the raw stamp files here.")
def main(n: int, tokens: int, concurrency: str, long_len: int, keep: str | None) -> None:
    """Stage-by-stage timing of streamed requests: steerlm (relay + generator), echo baselines, in-process engine."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from steer_train.tiny import init_tiny
    from steerlm.generation import Engine
    from steerlm.serve.repository import render_repository
    from steerlm.serve.triton import TritonServer
    from steerlm.tokenize import load_tokenizer
    from steerlm_client import SteerClient

    levels = [int(c) for c in concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    logs = work / "stamps"
    logs.mkdir()
    os.environ[STAGE_LOG] = str(logs)  # the server's stubs inherit it
    instrument_engine()
    try:
        model_dir = init_tiny(work / "model", max_positions=max(1024, long_len + 512))
        repo = render_repository(work / "repo", model_dir, backend="cpu", max_batch_size=max(levels))
        prepare_repository(repo)
        with TritonServer(repo_dir=repo, workdir=work / "triton", timeout=300) as server:
            url = server.grpc_url
            prompt = SteerClient(url, "grpc").complete(QUESTION, max_tokens=1).prompt
            prompt_ids = load_tokenizer(model_dir).encode(prompt).ids
            engine = Engine(model_dir, max_batch_size=max(levels))
            steer = {"text_input": QUESTION, "max_tokens": tokens, "min_tokens": tokens, "stream": True}
            echo = {"text_input": QUESTION, "max_tokens": tokens}
            paths = {
                "floor": lambda rid: floor_stream(engine, prompt_ids, tokens, rid),
                "steerlm": lambda rid: grpc_stream(url, "steerlm", steer, rid),
                "echo": lambda rid: grpc_stream(url, "echo", echo, rid),
                "echo_stream": lambda rid: grpc_stream(url, "echo_stream", {"TEXT": "x", "COUNT": tokens}, rid),
            }
            runs: dict[tuple[str, int], list[str]] = {}
            for c in levels:
                for kind, fn in paths.items():
                    fn(f"warm-{kind}-{c}-{uuid.uuid4().hex[:6]}")
                    rids = [f"{kind}-{c}-{i}-{uuid.uuid4().hex[:6]}" for i in range(max(n, c))]
                    if c == 1:
                        for rid in rids:
                            fn(rid)
                    else:
                        with ThreadPoolExecutor(c) as pool:
                            list(pool.map(fn, rids))
                    runs[kind, c] = rids
            if long_len:
                long_fields = {**steer, "max_tokens": long_len, "min_tokens": long_len}
                grpc_stream(url, "steerlm", long_fields, "long-steerlm")
                floor_stream(engine, prompt_ids, long_len, "long-floor")
            engine.close()
        time.sleep(0.5)
        stamps = read_stamps(logs)
        if keep:
            shutil.copytree(logs, keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(stamps, runs, levels, tokens)
    if long_len:
        report_long(stamps, long_len)


def report_long(stamps, long_len: int, window: int = 50) -> None:
    """Per-response stage costs early (responses 10-60) vs late (the last 50) in one long stream."""
    click.echo(f"\n### one {long_len}-token stream: per-response stages, early vs late (median ms)\n")
    click.echo(f"| path | stage | responses 10-{10 + window} | last {window} | late / early |")
    click.echo("|---|---|---|---|---|")
    for kind in ("steerlm", "floor"):
        for name, vals in sorted(per_token(stamps[f"long-{kind}"], kind).items()):
            vals = [v for v in vals if v is not None]
            if len(vals) < 10 + 2 * window:
                continue
            early, late = med(vals[10:10 + window]), med(vals[-window:])
            click.echo(f"| {kind} | {name} | {early:.3f} | {late:.3f} | {late / early:.2f} |")


def report(stamps, runs, levels, tokens) -> None:
    for c in levels:
        click.echo(f"\n### concurrency {c} ({tokens} tokens; median ms over requests)\n")
        click.echo("| stage | steerlm | floor (in-process) | echo ensemble |")
        click.echo("|---|---|---|---|")
        cols = [[stamps[r] for r in runs[k, c]] for k in ("steerlm", "floor", "echo")]
        for a, b, what in FIRST_TOKEN + [("cli_sent", "cli_recv_0", "(echo: sent -> first response, the whole server)")]:
            click.echo(f"| {what} | " + " | ".join(f"{med(gap(s, a, b) for s in col):.3f}" for col in cols) + " |")
        ttft = {k: med(gap(stamps[r], "cli_start", "cli_got_0") for r in runs[k, c])
                for k in ("floor", "steerlm", "echo", "echo_stream")}
        click.echo(f"| **TTFT (cli_start -> first piece)** | {ttft['steerlm']:.3f} | {ttft['floor']:.3f} | "
                   f"{ttft['echo']:.3f} |")
        click.echo(f"\nTTFT: floor {ttft['floor']:.2f}, steerlm {ttft['steerlm']:.2f}, echo ensemble "
                   f"{ttft['echo']:.2f}, echo_stream alone {ttft['echo_stream']:.2f} ms\n")
        click.echo("| per response after the first | steerlm | floor | echo |")
        click.echo("|---|---|---|---|")
        pt = {k: defaultdict(list) for k in ("steerlm", "floor", "echo")}
        for k in pt:
            for r in runs[k, c]:
                for name, vals in per_token(stamps[r], k).items():
                    pt[k][name] += [v for v in vals if v is not None]
        for name in sorted({x for k in pt for x in pt[k]}):
            click.echo(f"| {name} | " + " | ".join(f"{med(pt[k][name]):.3f}" for k in ("steerlm", "floor", "echo"))
                       + " |")
        calls = med(stamps[r].get("is_cancelled_calls") for r in runs["steerlm", c])
        spent = med(stamps[r].get("is_cancelled_ns", 0) / 1e6 for r in runs["steerlm", c])
        click.echo(f"\nsender.is_cancelled(): {calls:.0f} calls per request, {spent:.2f} ms in total per request\n")


if __name__ == "__main__":
    main()
