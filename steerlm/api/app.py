"""The FastAPI application: OpenAI-compatible routes, NeMo's /generate, models and health."""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from steerlm.api import errors, models, nemo_generate, openai_chat, openai_completions
from steerlm.api.service import Service


def create_app(model_dir: str | os.PathLike, grpc_url: str, *, triton_model: str = "steerlm",
               served_name: str = "steerlm", cancel_socket: str | os.PathLike | None = None) -> FastAPI:
    """The API for the checkpoint in `model_dir`, served by the Triton ensemble `triton_model` at `grpc_url`
    (host:port). The checkpoint is read for its schema, template and tokenizer only (no weights).
    `cancel_socket`: the generator's local channel (steerlm.serve.ipc), through which a request whose HTTP
    client went away is also ended in the engine."""
    service = Service(model_dir, grpc_url, triton_model=triton_model, served_name=served_name,
                      cancel_socket=cancel_socket)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.ensemble.close()

    app = FastAPI(title="SteerLM API", lifespan=lifespan)
    app.state.service = service
    app.state.started = int(time.time())
    errors.install(app)
    for module in (openai_chat, openai_completions, nemo_generate, models):
        app.include_router(module.router)
    return app
