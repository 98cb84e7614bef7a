"""The one place the `generator` Triton model gets its engine from (`generation_engine` in its config).

An engine implements the protocol of `steerlm.generation.Engine` (submit/close, GenerationRequest). Another
engine plugs in by adding its name and a `module:factory` here; the factory is imported only when chosen,
so the torch engine never needs TensorRT-LLM and the other way round.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from steerlm.sampling import GenerationRequest

ENGINES: dict[str, str] = {
    "torch": "steerlm.serve.engines:torch_engine",
    "trtllm": "steerlm.serve.llmapi:llmapi_engine",
}


class GenerationEngine(Protocol):
    def submit(self, request: GenerationRequest) -> None: ...

    def close(self) -> None: ...


def torch_engine(model_dir: Path, *, max_batch_size: int, device: str = "cpu", max_prefill_tokens: int | None = None,
                 **_: Any) -> GenerationEngine:
    from steerlm.generation import PREFILL_TOKENS, Engine

    return Engine(model_dir, max_batch_size=max_batch_size, device=device,
                  max_prefill_tokens=max_prefill_tokens or PREFILL_TOKENS)


def create_engine(name: str, model_dir: str | Path, *, max_batch_size: int, **options: Any) -> GenerationEngine:
    """The engine `name` for the checkpoint (or engine directory) `model_dir`; options come from the config."""
    if name not in ENGINES:
        raise ValueError(f"generation_engine {name!r} is not one of: {', '.join(ENGINES)}")
    module, _, factory = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), factory)(Path(model_dir), max_batch_size=max_batch_size,
                                                             **options)
