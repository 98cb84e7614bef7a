"""The logic of the `generator` Triton model: one process holds the engine and every request's text stream.

A request arrives over the local channel (steerlm.serve.ipc) as the signed document `RequestBuilder` built
(`PreparedRequest`); its tokens become text in the engine's own callbacks (`TextStream`: incremental
detokenization, stop strings never shown), and the responses go to the request's sink (a frame queue for
the `steerlm` relay's stream, a collector for a whole answer). Nothing waits on another Triton model, so no
thread pool can fill up with waiters (the hang of the earlier postprocessing -> BLS -> decoupled model design).

The request leaves the engine's batch as soon as its answer is complete in text (a stop string seen in
text) or it is cancelled, because the engine polls `cancelled()` before every decode step. Cancelled means
the response sink reports it (`is_cancelled`), `GeneratorCore.cancel` named its request id, or its `Job` was
cancelled (`Job.cancel`: the local channel, steerlm.serve.ipc, does that when the connection streaming it
closes). Every cancellation that ends a request is reported to `on_cancel` as a `Cancelled` record.

Tested without a server through `ResponseSink` fakes (tests/serving/test_generator.py).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol
from urllib.parse import quote, unquote

import numpy as np

from steerlm.sampling import GenerationRequest
from steerlm.serve.requests import PreparedRequest, RequestError
from steerlm.serve.textstream import TextStream

log = logging.getLogger(__name__)

CANCEL_MARK = "steerlm request cancelled:"
_CANCEL_LINE = re.compile(re.escape(CANCEL_MARK) + r" request_id=(\S*) by=(\S+) tokens=(\d+) monotonic=([0-9.]+)")


class ResponseSink(Protocol):
    """Where one request's responses go (the Triton response sender in the model)."""

    def send(self, outputs: dict[str, np.ndarray] | None, final: bool, error: str | None = None) -> None: ...

    def is_cancelled(self) -> bool: ...


def _text(value: str) -> np.ndarray:
    return np.array([[value.encode("utf-8")]], dtype=np.object_)


def _count(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


@dataclass(frozen=True)
class Cancelled:
    """A request that left the engine because it was cancelled: what it cost and when it left."""

    request_id: str
    by: str  # "client": the sink reported it or its stream's connection closed; "request-id": `GeneratorCore.cancel`
    tokens: int  # tokens generated for it, all of them before `left_at`
    left_at: float  # time.monotonic() when the engine was told to drop its row (system-wide on Linux)

    def log_line(self) -> str:
        # The id percent-encoded: one word however odd the client's id (Triton's log also escapes quotes).
        return (f"{CANCEL_MARK} request_id={quote(self.request_id, safe='')} by={self.by} "
                f"tokens={self.tokens} monotonic={self.left_at:.6f}")

    @classmethod
    def from_log(cls, text: str) -> list[Cancelled]:
        """Every record `log_line` wrote into a log's `text`."""
        return [cls(unquote(m[1]), m[2], int(m[3]), float(m[4])) for m in _CANCEL_LINE.finditer(text)]


class Job:
    """One request between the engine's callbacks and its sink; every method may run on any thread."""

    def __init__(self, prepared: PreparedRequest, sink: ResponseSink, text: TextStream, request_id: str = "",
                 on_cancel: Callable[[Cancelled], None] | None = None, sender_poll: float = 0.0) -> None:
        self.req = prepared
        self.sink = sink
        self.text = text
        self.request_id = request_id
        self.on_cancel = on_cancel
        self.lock = threading.Lock()
        self.done = False
        self.first = True
        self.generated = 0
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.abort: str | None = None  # who cancelled it (Cancelled.by), seen at the engine's next step
        self.sender_poll = sender_poll
        self.next_poll = 0.0  # the sink is asked before the first step, then at most every `sender_poll` s

    def cancel(self, by: str = "client") -> None:
        """End this request at the engine's next step (any thread)."""
        self.abort = self.abort or by

    # -- engine callbacks ---------------------------------------------------------------------------------
    def emit(self, tokens: list[int], final: bool) -> None:
        with self.lock:
            if self.done:
                return
            self.generated += len(tokens)
            piece = self.text.feed(tokens)
            complete = final or self.text.done
            if complete:
                piece += self.text.finish()
                self.finish_reason = ("length" if not self.text.filter.stopped and self.generated >= self.req.max_tokens
                                      else "stop")
            if self.req.stream:
                if piece or self.first or complete:
                    self._send(piece, final=complete)
            else:
                self.pieces.append(piece)
                if complete:
                    self._send("".join(self.pieces), final=True)

    def fail(self, message: str) -> None:
        with self.lock:
            if not self.done:
                self.done = True
                self.sink.send(None, final=True, error=message)

    def cancelled(self) -> bool:
        """True once the answer is complete (the engine may drop the row) or the client has gone."""
        if self.done:
            return True
        by = self.abort
        if not by:
            now = time.monotonic()
            if now < self.next_poll:
                return False
            self.next_poll = now + self.sender_poll
            if not self.sink.is_cancelled():
                return False
        with self.lock:
            if self.done:
                return True
            self.done = True
            self.finish_reason = "cancelled"
            record = Cancelled(self.request_id, by or "client", self.generated, time.monotonic())
            self.sink.send(None, final=True)
        if self.on_cancel is not None:
            self.on_cancel(record)
        return True

    # -- responses ----------------------------------------------------------------------------------------
    def _send(self, text: str, final: bool) -> None:
        outputs = {"text_output": _text(text)}
        if self.first:
            outputs["prompt"] = _text(self.req.prompt)
            # Like the C++ backend: only a whole answer repeats the prompt, a stream never does.
            if not self.req.exclude_input_in_output and not self.req.stream:
                outputs["text_output"] = _text(self.req.prompt + text)
            if self.req.return_num_input_tokens:
                outputs["num_input_tokens"] = _count(len(self.req.input_ids))
        if final:
            outputs["finish_reason"] = _text(self.finish_reason or "stop")
            if self.req.return_num_output_tokens:
                outputs["num_output_tokens"] = _count(self.generated)
            self.done = True
        self.first = False
        self.sink.send(outputs, final=final)


class GeneratorCore:
    """Runs prepared requests on an engine and answers each through its own sink."""

    def __init__(self, engine, tokenizer, trailer: str, key: bytes,
                 on_cancel: Callable[[Cancelled], None] | None = None, sender_poll: float = 0.05) -> None:
        """`on_cancel` is called once per cancelled request, on the engine's thread. `sender_poll`: how often
        a running request asks its sink `is_cancelled()` (the first time before its first step), for sinks
        whose question is costly (a Triton response sender: a round trip to the server process, ~60 us on 2
        shared cores, ~9% of the engine thread at 16 rows when asked every step). The local channel's sinks
        are cancelled through `Job.cancel` instead, and cancels by request id (`cancel`); both are seen at the
        next step."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.trailer = trailer
        self.key = key
        self.on_cancel = on_cancel
        self.sender_poll = sender_poll
        # Running requests by their Triton request id, for `cancel` (the OpenAI/NeMo API cancels its requests
        # by id as soon as its client hangs up, docs/serving.md "Cancellation").
        self._by_id: dict[str, list[Job]] = {}
        # Cancels that came before their request (still being tokenized): id -> until when it is refused.
        self._early: dict[str, float] = {}
        self._lock = threading.Lock()

    def cancel(self, request_id: str, remember: float = 60.0) -> bool:
        """End the running requests with this Triton request id at the engine's next step. False if none runs;
        a request with this id that arrives within `remember` seconds is then ended before its first step."""
        with self._lock:
            jobs = [j for j in self._by_id.pop(request_id, []) if not j.done]
            if not jobs:
                self._early[request_id] = time.monotonic() + remember
        for job in jobs:
            job.cancel("request-id")
        return bool(jobs)

    def _register(self, request_id: str, job: Job) -> None:
        with self._lock:
            # Finished requests and old early cancels leave the indexes here, so they stay about as large as
            # the number of running requests.
            now = time.monotonic()
            self._early = {k: until for k, until in self._early.items() if until > now}
            if self._early.pop(request_id, None) is not None:
                job.cancel("request-id")
            self._by_id = {k: live for k, jobs in self._by_id.items() if (live := [j for j in jobs if not j.done])}
            self._by_id.setdefault(request_id, []).append(job)

    def submit(self, document: bytes, signature: bytes, sink: ResponseSink, request_id: str = "") -> Job | None:
        """Start one request and return its `Job` (None: it could not start and its sink has the error).
        A non-empty `request_id` (the client's Triton request id) makes it cancellable by `cancel`."""
        try:
            prepared = PreparedRequest.from_wire(document, signature, self.key)
        except (RequestError, ValueError, TypeError) as exc:
            message = str(exc) if isinstance(exc, RequestError) else "malformed request document"
            sink.send(None, final=True, error=message)
            return None
        text = TextStream(self.tokenizer, prepared.stop_strings, end_id=prepared.end_id,
                          max_tokens=prepared.max_tokens, trailer=self.trailer)
        job = Job(prepared, sink, text, request_id, self.on_cancel, self.sender_poll)
        if request_id:
            self._register(request_id, job)
        try:
            # Tokens come one by one even for a whole answer: its stop strings are found in text as they appear.
            self.engine.submit(GenerationRequest(prepared.input_ids, prepared.params(), job.emit,
                                                 stream=True, fail=job.fail, cancelled=job.cancelled))
        except Exception as exc:  # e.g. the engine is shutting down
            job.fail(f"generation could not start: {exc}")
        return job


class Watchdog:
    """Calls `on_stall(message)` when the engine has work but has made no progress for `timeout` seconds,
    and `on_tick(engine)` every `interval` seconds (metrics). Runs on its own daemon thread."""

    def __init__(self, engine, timeout: float, on_stall: Callable[[str], None],
                 on_tick: Callable[[object], None] | None = None, interval: float = 0.25) -> None:
        self.engine, self.timeout, self.on_stall, self.on_tick = engine, timeout, on_stall, on_tick
        self.interval = interval
        self._stop = threading.Event()
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="steerlm-watchdog", daemon=True)
        self._thread.start()

    def check(self, now: float) -> str | None:
        """The stall message if the engine is stalled at `now`, else None (always None for an engine without
        the optional `pending()` and `last_progress` of `steerlm.generation.Engine`)."""
        if not hasattr(self.engine, "pending") or not hasattr(self.engine, "last_progress"):
            return None
        if self.engine.pending() == 0:
            self._busy_since = None
            return None
        if self._busy_since is None:
            self._busy_since = now
        idle = now - max(self._busy_since, self.engine.last_progress)
        if idle > self.timeout:
            return (f"generation engine made no progress for {idle:.0f} s with {self.engine.pending()} "
                    f"request(s) pending (stall timeout {self.timeout:g} s)")
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.on_tick is not None:
                    self.on_tick(self.engine)
                message = self.check(time.monotonic())
            except Exception:
                log.exception("watchdog check failed")
                continue
            if message:
                self.on_stall(message)
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
