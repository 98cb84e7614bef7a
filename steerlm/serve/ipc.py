"""A local channel into the generator process, so that whole answers need no second engine copy.

Triton's ensemble can only end in the decoupled `generator`, which a unary `infer()` cannot call. The
generator therefore also listens on a Unix domain socket (mode 0600, in the rendered repository's `.run`
directory) and the non-decoupled models (`generator_whole`, the NeMo-compatible model) send it the same
signed request document the ensemble passes; the signature check stays the gate.

Messages are JSON objects, each framed by a 4-byte big-endian length:
  {"op": "submit", "id": str, "document": str, "signature": str}
      -> {"text", "prompt", "finish_reason", "num_input_tokens", "num_output_tokens"} or {"error": str}
  {"op": "cancel", "id": str} -> {"cancelled": bool}   (a submit's id, or the Triton request id of a request
                                                        that came through the `steerlm` ensemble)
A submit whose connection closes before its answer is cancelled too, like a client that goes away.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerlm.serve.generator import GeneratorCore

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


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    sock.sendall(_HEADER.pack(len(data)) + data)


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
        for name, value in (outputs or {}).items():
            item = value.reshape(-1)[0]
            if name == "text_output":
                self.pieces.append(item.decode("utf-8"))
            else:
                self.fields[name] = item.decode("utf-8") if isinstance(item, bytes) else int(item)
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
    """Serves submit/cancel messages for `core` on a Unix socket at `path`, one thread per connection.
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
                if op == "submit":
                    reply = self._submit(conn, message)
                elif op == "cancel":
                    reply = {"cancelled": self.cancel(str(message.get("id")))}
                else:
                    reply = {"error": f"op must be one of: submit, cancel; got {op!r}"}
                if not self._try_send(conn, reply):
                    return

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
        """End the running request `request_id` (submitted here, or through Triton with that request id) at
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
