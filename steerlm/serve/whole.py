"""Whole answers for the non-decoupled models (`generator_whole`, the NeMo-compatible model).

Each signed request document goes to the `generator` process over its local socket (steerlm.serve.ipc), one
connection per request, so the requests Triton hands one execute() call generate together in the engine's
batch rather than one after another.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from steerlm.serve.ipc import IpcClient, IpcError

# Outputs named as the ensemble's; token counts only when the request asked for them.
_OUTPUTS = {"text": "text_output", "prompt": "prompt", "finish_reason": "finish_reason",
            "num_input_tokens": "num_input_tokens", "num_output_tokens": "num_output_tokens"}


class WholeForwarder:
    """Runs signed documents through the generator at `socket_path` and returns their whole answers."""

    def __init__(self, socket_path: str | os.PathLike, max_parallel: int = 64, timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="steerlm-whole")

    def run(self, document: bytes, signature: bytes) -> dict[str, Any] | str:
        """The outputs of one request by tensor name, or the error message that refuses it."""
        try:
            with IpcClient(self.socket_path, timeout=self.timeout) as client:
                result = client.submit(document, signature)
        except IpcError as exc:
            return str(exc)
        return {_OUTPUTS[k]: v for k, v in asdict(result).items() if v is not None}

    def run_all(self, jobs: Sequence[tuple[bytes, bytes] | None]) -> list[dict[str, Any] | str]:
        """`run` for every job at once, in order; a None job is refused (it did not come from preprocessing)."""
        futures = [None if job is None else self.pool.submit(self.run, *job) for job in jobs]
        return ["this model takes requests from the steerlm_whole ensemble only" if f is None else f.result()
                for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
