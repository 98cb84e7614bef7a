"""The `steerlm` ensemble over Triton gRPC streaming (`ModelStreamInfer`), from asyncio.

One stream per request: the request is written, the stream is half-closed, and Triton ends the call once the
request's last response is sent. A caller that stops early (the HTTP client went away) cancels the call, which
Triton turns into a cancelled request (CONTRACTS.md section 3 names the tensors), which the `steerlm` relay
passes on to the engine within its poll interval. With the generator's local channel (`cancel_socket`,
steerlm.serve.ipc) the request, sent under a unique Triton request id, is also cancelled there by that id at
once, and even before it reaches the engine.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import numpy as np

# Ensemble input -> Triton datatype. Inputs the running ensemble does not declare are never sent.
DTYPES = {
    "text_input": "BYTES", "attributes": "BYTES", "system": "BYTES", "history": "BYTES", "stop_words": "BYTES",
    "bad_words": "BYTES", "max_tokens": "INT32", "top_k": "INT32", "temperature": "FP32", "top_p": "FP32",
    "seed": "UINT64", "stream": "BOOL", "min_tokens": "INT32", "repetition_penalty": "FP32",
    "presence_penalty": "FP32", "frequency_penalty": "FP32", "return_num_input_tokens": "BOOL",
    "return_num_output_tokens": "BOOL",
}
log = logging.getLogger(__name__)
_NUMPY = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": bool}


class EnsembleError(RuntimeError):
    """The ensemble refused the request (`bad_request`) or could not run it."""

    def __init__(self, message: str, bad_request: bool = False) -> None:
        super().__init__(message)
        self.bad_request = bad_request


@dataclass
class Piece:
    """One streamed response: new answer text, and what the ensemble tells with it."""

    text: str
    prompt: str = ""
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    finish_reason: str | None = None


class Ensemble:
    """Client of one ensemble model; `inputs`/`outputs` are what the running model declares."""

    def __init__(self, grpc_url: str, model: str = "steerlm", cancel_socket: str | os.PathLike | None = None) -> None:
        self.grpc_url = grpc_url
        self.model = model
        self.cancel_socket = cancel_socket
        self.inputs: set[str] = set()
        self.outputs: set[str] = set()
        self._client = None

    async def connect(self) -> None:
        import tritonclient.grpc.aio as grpcclient

        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.grpc_url)
        config = (await self._client.get_model_config(self.model, as_json=True))["config"]
        self.inputs = {t["name"] for t in config.get("input", [])}
        self.outputs = {t["name"] for t in config.get("output", [])}

    async def ready(self) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            if self._client is None or not self.inputs:
                await self.connect()
            return bool(await self._client.is_model_ready(self.model))
        except (InferenceServerException, OSError):
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def supports(self, name: str) -> bool:
        return name in self.inputs

    async def generate(self, fields: Mapping[str, Any]) -> AsyncIterator[Piece]:
        """The responses of one request. Leaving the iteration early cancels the request in Triton."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if not self.inputs:
            await self.connect()
        fields = dict(fields)
        for flag, output in (("return_num_input_tokens", "num_input_tokens"),
                             ("return_num_output_tokens", "num_output_tokens")):
            if flag in self.inputs and output in self.outputs:
                fields[flag] = True
        tensors = [_tensor(grpcclient, name, value) for name, value in fields.items() if value is not None]

        request_id = uuid.uuid4().hex

        async def requests():
            yield {"model_name": self.model, "inputs": tensors, "request_id": request_id}

        call = self._client.stream_infer(requests())
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    finished = True  # an error response ends the request
                    message = error.message() if callable(getattr(error, "message", None)) else str(error)
                    raise EnsembleError(message, bad_request="bad request" in message)
                yield _piece(result, self.outputs)
            finished = True
        except InferenceServerException as exc:
            finished = True
            raise EnsembleError(str(exc)) from None
        finally:
            if not finished:
                call.cancel()
                self._cancel_in_engine(request_id)

    def _cancel_in_engine(self, request_id: str) -> None:
        if self.cancel_socket is None:
            return
        from steerlm.serve.ipc import IpcClient, IpcError

        # A blocking call on purpose: it takes a local round trip, and it must not wait for an event loop
        # that is cancelling this very task.
        try:
            with IpcClient(self.cancel_socket, timeout=5) as channel:
                channel.cancel(request_id)
        except (IpcError, OSError) as exc:
            log.warning("could not cancel request %s in the generator: %s", request_id, exc)


def _tensor(grpcclient, name: str, value):
    dtype = DTYPES[name]
    values = value if isinstance(value, list) else [value]
    if dtype == "BYTES":
        values = [v.encode("utf-8") for v in values]
    arr = np.array([values], dtype=_NUMPY[dtype])  # [batch 1, n]
    tensor = grpcclient.InferInput(name, list(arr.shape), dtype)
    tensor.set_data_from_numpy(arr)
    return tensor


def _first(result, name: str, outputs: set[str]):
    if name not in outputs:
        return None
    arr = result.as_numpy(name)
    if arr is None or arr.size == 0:
        return None
    value = arr.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _piece(result, outputs: set[str]) -> Piece:
    arr = result.as_numpy("text_output")
    text = "" if arr is None else "".join(
        v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1))
    n_in, n_out = _first(result, "num_input_tokens", outputs), _first(result, "num_output_tokens", outputs)
    return Piece(
        text=text,
        prompt=_first(result, "prompt", outputs) or "",
        num_input_tokens=None if n_in is None else int(n_in),
        num_output_tokens=None if n_out is None else int(n_out),
        finish_reason=_first(result, "finish_reason", outputs) or None,
    )

