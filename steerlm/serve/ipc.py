"""The local channel into the generator process: every request reaches the one engine this way.

The generator listens on a Unix domain socket (mode 0600, in the rendered repository's `.run` directory).
The models Triton calls (`steerlm`/`ensemble`, the relay; `generator_whole`; the NeMo-compatible model) send it
the signed request document preprocessing's logic built; the signature check stays the gate.

Messages are JSON objects, each framed by a 4-byte big-endian length:
  {"op": "stream", "id": str, "document": str, "signature": str}
      -> frames {"outputs": {name: str | int}, "final": bool} (one per response the generator sends: the
         outputs of the `steerlm` contract), or a final {"final": true, "error": str}
  {"op": "submit", "id": str, "document": str, "signature": str}
      -> {"text", "prompt", "finish_reason", "num_input_tokens", "num_output_tokens"} or {"error": str}
  {"op": "cancel", "id": str} -> {"cancelled": bool}   (the id a stream or submit was sent with: the Triton
                                                        request id of a `steerlm` request)
A stream or submit whose connection closes before its final answer is cancelled: a relay whose client went
away closes it, and so does the kernel when the relay's process dies, so no row outlives its asker.
The engine's thread never writes to a socket: a stream's responses queue up for its connection's thread.
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import struct
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerlm.serve.generator import GeneratorCore, Job

_HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 * 1024 * 1024
RUN_DIR = ".run"
SOCKET_NAME = "generator.sock"
# sun_path holds 108 bytes; a longer path is reached through its directory's /proc/self/fd entry.
_SUN_PATH_MAX = 100


class IpcError(RuntimeError):
    """The channel broke or a message is malformed."""


def socket_path(repo_dir: str | os.PathLike) -> Path:
    """Where the generator of the repository rendered at `repo_dir` listens."""
    return Path(repo_dir) / RUN_DIR / SOCKET_NAME


def pack_message(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(data)) + data


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(pack_message(message))


def _read(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise IpcError("connection closed in the middle of a message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the peer closed the connection between messages."""
    first = sock.recv(_HEADER.size)
    if not first:
        return None
    (size,) = _HEADER.unpack(first + _read(sock, _HEADER.size - len(first)))
    if size > MAX_MESSAGE:
        raise IpcError(f"message of {size} bytes is over the limit of {MAX_MESSAGE}")
    try:
        message = json.loads(_read(sock, size))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IpcError(f"message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise IpcError("message is not a JSON object")
    return message


def _address(path: Path) -> tuple[str, int | None]:
    """(address to bind/connect, directory fd to close afterwards) for a path of any length."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def encode_outputs(outputs: dict[str, np.ndarray] | None) -> dict[str, str | int]:
    """A response's tensors ([1, 1] text or count each) as JSON values by name."""
    fields: dict[str, str | int] = {}
    for name, value in (outputs or {}).items():
        item = value.reshape(-1)[0]
        fields[name] = item.decode("utf-8") if isinstance(item, bytes) else int(item)
    return fields


def decode_outputs(fields: dict[str, str | int]) -> dict[str, np.ndarray]:
    """The inverse of `encode_outputs`: text as [1, 1] BYTES, counts as [1, 1] INT32."""
    return {name: np.array([[value.encode("utf-8")]], dtype=np.object_) if isinstance(value, str)
            else np.array([[value]], dtype=np.int32) for name, value in fields.items()}


@dataclass
class WholeResult:
    text: str
    prompt: str
    finish_reason: str
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None


class _CollectSink:
    """A ResponseSink that gathers one request's responses into a WholeResult."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.fields: dict[str, Any] = {}
        self.error: str | None = None
        self.done = threading.Event()
        self.cancel = threading.Event()

    def send(self, outputs: dict[str, np.ndarray] | None, final: bool, error: str | None = None) -> None:
        if error is not None:
            self.error = error
        for name, value in encode_outputs(outputs).items():
            if name == "text_output":
                self.pieces.append(value)
            else:
                self.fields[name] = value
        if final:
            self.fields.setdefault("finish_reason", "cancelled" if self.cancel.is_set() else "stop")
            self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel.is_set()

    def reply(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return asdict(WholeResult(text="".join(self.pieces), prompt=self.fields.get("prompt", ""),
                                  finish_reason=self.fields["finish_reason"],
                                  num_input_tokens=self.fields.get("num_input_tokens"),
                                  num_output_tokens=self.fields.get("num_output_tokens")))


class _StreamSink:
    """A ResponseSink whose responses become frames queued for the connection's thread: the engine's thread
    only appends, so a slow or stuck reader never holds up the batch."""

    def __init__(self) -> None:
        self.frames: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    def send(self, outputs: dict[str, np.ndarray] | None, final: bool, error: str | None = None) -> None:
        frame: dict[str, Any] = {"outputs": encode_outputs(outputs), "final": final}
        if error is not None:
            frame["error"] = error
        self.frames.put(frame)

    def is_cancelled(self) -> bool:
        return False  # a closed connection cancels the Job directly (IpcServer._stream)


def _closed(conn: socket.socket) -> bool:
    """True when the peer has closed `conn` (readable with nothing to read); never consumes data."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class IpcServer:
    """Serves stream/submit/cancel messages for `core` on a Unix socket at `path`, one thread per connection.
    Without `path` it listens nowhere and serves only the connections handed to `serve_connection`."""

    def __init__(self, core: GeneratorCore, path: str | os.PathLike | None = None, poll: float = 0.05) -> None:
        self.core, self.poll = core, poll
        self._running: dict[str, _CollectSink] = {}
        self._lock = threading.Lock()
        self.path: Path | None = None
        self._sock: socket.socket | None = None
        if path is not None:
            self._listen(Path(path))

    def _listen(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address, fd = _address(path)
        try:
            self._sock.bind(address)
        finally:
            if fd is not None:
                os.close(fd)
        os.chmod(path, 0o600)
        self._sock.listen(128)
        self._thread = threading.Thread(target=self._accept, name="steerlm-ipc", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self.serve_connection, args=(conn,), name="steerlm-ipc-conn", daemon=True).start()

    def serve_connection(self, conn: socket.socket) -> None:
        """Answer the messages of one connection until it closes (also usable on one end of a socketpair)."""
        with conn:
            while True:
                try:
                    message = recv_message(conn)
                except (IpcError, OSError) as exc:
                    self._try_send(conn, {"error": f"bad message: {exc}"})
                    return
                if message is None:
                    return
                op = message.get("op")
                if op == "stream":
                    if not self._stream(conn, message):
                        return
                    continue
                if op == "submit":
                    reply = self._submit(conn, message)
                elif op == "cancel":
                    reply = {"cancelled": self.cancel(str(message.get("id")))}
                else:
                    reply = {"error": f"op must be one of: stream, submit, cancel; got {op!r}"}
                if not self._try_send(conn, reply):
                    return

    def _stream(self, conn: socket.socket, message: dict[str, Any]) -> bool:
        """Send one request's responses as frames until its final one; False when the connection closed first
        (the request is then cancelled: its relay went away)."""
        document, signature = message.get("document"), message.get("signature")
        if not isinstance(document, str) or not isinstance(signature, str):
            return self._try_send(conn, {"outputs": {}, "final": True,
                                         "error": "stream needs string fields document and signature"})
        sink = _StreamSink()
        job: Job | None = self.core.submit(document.encode("utf-8"), signature.encode("ascii", "replace"), sink,
                                           str(message.get("id") or ""))
        while True:
            try:
                frames = [sink.frames.get(timeout=self.poll)]
            except queue.Empty:
                if _closed(conn):
                    break
                continue
            while not frames[-1]["final"]:  # what queued up meanwhile goes in the same write
                try:
                    frames.append(sink.frames.get_nowait())
                except queue.Empty:
                    break
            try:
                # MSG_NOSIGNAL: a relay that went away must be an EPIPE here, never a SIGPIPE that ends the
                # generator's process (the python backend's stub need not ignore SIGPIPE as python does).
                conn.sendall(b"".join(map(pack_message, frames)), socket.MSG_NOSIGNAL)
            except OSError:
                break
            if frames[-1]["final"]:
                return True
        if job is not None:
            job.cancel("client")  # only this request: another with the same id is not this client's
        return False

    def _submit(self, conn: socket.socket, message: dict[str, Any]) -> dict[str, Any]:
        document, signature = message.get("document"), message.get("signature")
        if not isinstance(document, str) or not isinstance(signature, str):
            return {"error": "submit needs string fields document and signature"}
        request_id = str(message.get("id") or uuid.uuid4().hex)
        sink = _CollectSink()
        with self._lock:
            if request_id in self._running:
                return {"error": f"request id {request_id!r} is already running"}
            self._running[request_id] = sink
        try:
            self.core.submit(document.encode("utf-8"), signature.encode("ascii", "replace"), sink, request_id)
            while not sink.done.wait(self.poll):
                if not sink.cancel.is_set() and _closed(conn):
                    self.cancel(request_id)  # the asker has gone: free the engine's row at its next step
            return sink.reply()
        finally:
            with self._lock:
                self._running.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        """End the running request `request_id` (the id it was streamed or submitted with: the Triton request id) at
        the engine's next step; False when none runs."""
        with self._lock:
            sink = self._running.get(request_id)
        if sink is not None:
            sink.cancel.set()  # its answer says "cancelled"
        # By id rather than through the sink: the engine checks ids every step, a sink's is_cancelled less often.
        return self.core.cancel(request_id) or sink is not None

    @staticmethod
    def _try_send(conn: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            send_message(conn, reply)
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._thread.join(timeout=5)
            self.path.unlink(missing_ok=True)


class IpcClient:
    """One connection to the generator's channel; use one per concurrent request (not thread-safe)."""

    def __init__(self, path: str | os.PathLike, timeout: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        address, fd = _address(Path(path))
        try:
            self.sock.connect(address)
        except OSError as exc:
            self.sock.close()
            raise IpcError(f"the generator is not reachable at {path}: {exc}") from None
        finally:
            if fd is not None:
                os.close(fd)

    @classmethod
    def from_socket(cls, sock: socket.socket) -> IpcClient:
        client = cls.__new__(cls)
        client.sock = sock
        return client

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            send_message(self.sock, message)
            reply = recv_message(self.sock)
        except OSError as exc:
            raise IpcError(f"the generator's channel broke: {exc}") from None
        if reply is None:
            raise IpcError("the generator closed the channel without answering")
        return reply

    def submit(self, document: bytes, signature: bytes, request_id: str | None = None) -> WholeResult:
        """The whole answer of one signed request; a refused or failed request raises IpcError with why."""
        reply = self._call({"op": "submit", "id": request_id or uuid.uuid4().hex,
                            "document": document.decode("utf-8"), "signature": signature.decode("ascii")})
        if "error" in reply:
            raise IpcError(reply["error"])
        return WholeResult(**reply)

    def stream(self, document: bytes, signature: bytes, request_id: str = "") -> IpcStream:
        """Start one signed request; its responses come from the returned stream, which owns this connection.
        Closing it before the final frame cancels the request."""
        try:
            send_message(self.sock, {"op": "stream", "id": request_id, "document": document.decode("utf-8"),
                                     "signature": signature.decode("ascii")})
        except OSError as exc:
            raise IpcError(f"the generator's channel broke: {exc}") from None
        return IpcStream(self.sock)

    def cancel(self, request_id: str) -> bool:
        """Ask the generator to end `request_id`; True when it was running."""
        reply = self._call({"op": "cancel", "id": request_id})
        if "error" in reply:
            raise IpcError(reply["error"])
        return bool(reply["cancelled"])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> IpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IpcStream:
    """The frames of one streamed request (`IpcClient.stream`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next frame, or None when none came within `timeout` seconds. Raises IpcError when the generator
        closed the channel (its process ended) or the frame is malformed."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return None
        try:
            frame = recv_message(self.sock)
        except OSError as exc:
            raise IpcError(f"the generator's channel broke: {exc}") from None
        if frame is None:
            raise IpcError("the generator closed the channel before the final response")
        if not isinstance(frame.get("outputs"), dict) or not isinstance(frame.get("final"), bool):
            raise IpcError("malformed frame from the generator")
        return frame

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> IpcStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
