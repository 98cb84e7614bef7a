"""Serving SteerLM through a real Triton ensemble: repository rendering, server launch, request logic.

`python -m steerlm.serve` (what `make serve` runs) renders the repository and starts tritonserver;
`TritonServer` does the same from Python (tests, evaluation, annotation)."""

from steerlm.serve.repository import RenderError, render_repository
from steerlm.serve.triton import ServerError, TritonServer

__all__ = ["RenderError", "ServerError", "TritonServer", "render_repository"]
