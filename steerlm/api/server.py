"""Run the API with uvicorn on a background thread: next to tritonserver in `make serve`, and in tests."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import uvicorn

from steerlm.api.app import create_app


class ApiServer:
    """The HTTP API on `host:port` (port 0: a free one, bound before start() returns).

    Use as a context manager or start()/stop(); `base_url` is the OpenAI base URL (…/v1)."""

    def __init__(self, model_dir: str | os.PathLike, grpc_url: str, *, host: str = "127.0.0.1", port: int = 0,
                 triton_model: str = "steerlm", served_name: str = "steerlm", timeout: float = 60.0,
                 cancel_socket: str | os.PathLike | None = None) -> None:
        self.app = create_app(model_dir, grpc_url, triton_model=triton_model, served_name=served_name,
                              cancel_socket=cancel_socket)
        self.host = host
        # Binding here, not in uvicorn, makes the port known (and owned) before anyone is told it.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise OSError(f"cannot bind the API to {host}:{port}: {exc.strerror}") from None
        self.port = self._sock.getsockname()[1]
        self.timeout = timeout
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> "ApiServer":
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="steerlm-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.timeout)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def beside(model_dir: str | os.PathLike | None, grpc_url: str, port: int,
           echo: Callable[[str], None] = print,
           cancel_socket: str | os.PathLike | None = None) -> Iterator[ApiServer | None]:
    """The API next to a running tritonserver for `python -m steerlm.serve` (port -1 or no generator: none)."""
    if model_dir is None or port < 0:
        yield None
        return
    try:
        api = ApiServer(model_dir, grpc_url, port=port, cancel_socket=cancel_socket).start()
    except OSError as exc:
        raise SystemExit(f"Error: {exc} (choose another with --api-port, 0 for any free port)") from None
    attributes = api.app.state.service.spec.schema.attributes
    knob = next((a for a in attributes if a.name == "verbosity"), attributes[0])
    try:
        echo(f"  OpenAI   {api.base_url}   (POST /chat/completions, /completions; GET /models)\n"
             f"  NeMo     {api.url}/generate   (PUT, as megatron_gpt_eval's server; GET {api.url}/health)\n"
             f"  Try:  python -c \"from openai import OpenAI; print(OpenAI(base_url='{api.base_url}', api_key='-')"
             f".chat.completions.create(model='steerlm', messages=[{{'role': 'user', 'content': 'Hi!'}}], "
             f"extra_body={{'attributes': {{'{knob.name}': {knob.max}}}}}).choices[0].message.content)\"")
        yield api
    finally:
        api.stop()
