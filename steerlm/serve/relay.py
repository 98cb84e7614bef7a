"""The logic of the `steerlm` Triton model (also `ensemble`): the decoupled model clients stream from.

Per request it builds the signed request exactly as `preprocessing` does (`RequestBuilder.from_inputs`: the
same validation, errors naming the input, byte limits checked before any text is read), opens a stream to the
`generator` process over its local socket (steerlm.serve.ipc `stream`) and forwards every frame to the
request's own response sender. Triton reports a client's cancellation (a cancelled gRPC stream, a killed
client, a closed HTTP connection) to the sender of the model it calls directly, which is this one; the relay
asks `is_cancelled()` at most every `poll` seconds and, when it turns true, closes the stream's connection,
which the generator treats as a cancel (so does the kernel's close when this process dies).

No Triton request waits on another Triton model (no BLS), and a relayed request holds no Triton thread: the
execute() that received it returns once the stream is open, and a thread of this process pumps its frames.

Tested without a server through fake senders and a socketpair (tests/serving/test_relay.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from steerlm.serve.ipc import IpcClient, IpcError, IpcStream, decode_outputs
from steerlm.serve.requests import RequestBuilder, RequestError

log = logging.getLogger(__name__)

GENERATOR_GONE = "generation failed: the generator process ended before the answer was complete"


class ResponseSender(Protocol):
    """Triton's response sender of one request, as the model maps it."""

    def send(self, outputs: dict[str, np.ndarray] | None, final: bool, error: str | None = None) -> None: ...

    def is_cancelled(self) -> bool: ...


class Relay:
    """Builds, signs and streams requests to the generator; one instance per model instance."""

    def __init__(self, builder: RequestBuilder, key: bytes, limit: int, connect: Callable[[], IpcClient],
                 poll: float = 0.05) -> None:
        """`connect` opens a new connection to the generator's socket (one per request); `poll`: how often a
        streaming request asks its sender `is_cancelled()` (a round trip to the server process)."""
        self.builder, self.key, self.limit, self.connect, self.poll = builder, key, limit, connect, poll
        self._live: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def start(self, inputs: Mapping[str, np.ndarray], sender: ResponseSender, request_id: str = "") -> None:
        """Start one request; its responses go to `sender` from a thread of this relay. A request that cannot
        start is answered with its error at once."""
        try:
            document, signature = self.builder.from_inputs(inputs, self.limit).to_wire(self.key)
        except RequestError as exc:
            sender.send(None, final=True, error=f"bad request: {exc}")
            return
        try:
            client = self.connect()
        except IpcError as exc:
            sender.send(None, final=True, error=f"generation unavailable: {exc}")
            return
        try:
            stream = client.stream(document, signature, request_id)
        except IpcError as exc:
            client.close()
            sender.send(None, final=True, error=f"generation unavailable: {exc}")
            return
        thread = threading.Thread(target=self._pump, args=(stream, sender), name="steerlm-relay", daemon=True)
        with self._lock:
            self._live.add(thread)
        thread.start()

    def _pump(self, stream: IpcStream, sender: ResponseSender) -> None:
        try:
            with stream:
                self._forward(stream, sender)
        except Exception:  # never leave a Triton request without its final response
            log.exception("relaying a stream failed")
            sender.send(None, final=True, error="generation failed: internal error in the steerlm relay")
        finally:
            with self._lock:
                self._live.discard(threading.current_thread())

    def _forward(self, stream: IpcStream, sender: ResponseSender) -> None:
        next_poll = 0.0  # asked before the first frame, then at most every `poll` seconds
        while True:
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + self.poll
                if sender.is_cancelled():
                    stream.close()  # the generator drops the row at its next step
                    sender.send(None, final=True)
                    return
            try:
                frame = stream.next(max(next_poll - time.monotonic(), 0.0))
            except IpcError as exc:
                log.error("%s: %s", GENERATOR_GONE, exc)
                sender.send(None, final=True, error=GENERATOR_GONE)
                return
            if frame is None:
                continue
            if "error" in frame:
                sender.send(None, final=True, error=str(frame["error"]))
                return
            sender.send(decode_outputs(frame["outputs"]) or None, final=frame["final"])
            if frame["final"]:
                return

    def live(self) -> int:
        """Requests being relayed now."""
        with self._lock:
            return len(self._live)

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the requests being relayed to end (shutdown, tests)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._live)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
