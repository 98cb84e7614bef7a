"""What every route shares: one conversation and its sampling settings -> a validated ensemble request -> text.

Requests are validated here with the same code and messages as the ensemble's preprocessing model
(`steerlm.serve.requests.RequestBuilder`, on the checkpoint the ensemble serves), so a bad field is answered
with HTTP 400 naming it before Triton is involved, and the prompt's token count is exact.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Mapping, TypeVar

from fastapi import Request

from steerlm.api.errors import ApiError, unsupported
from steerlm.api.triton import Ensemble, EnsembleError, Piece
from steerlm.rawprompt import ParsedPrompt, PromptParseError, looks_raw, parse_prompt
from steerlm.serve.requests import RequestBuilder, RequestError

T = TypeVar("T")


@dataclass
class Conversation:
    question: str
    labels: str | None = None  # the open turn's attributes, label form ("verbosity:4"); others: defaults
    system: str | None = None
    history: list[dict] = field(default_factory=list)  # {"question", "answer", "labels"|"attributes"}


@dataclass
class Sampling:
    max_tokens: int | None = None  # None: whatever the context leaves
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Sent only when set to something else than the neutral value, and only to an ensemble that has the input.
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


# The ensemble's optional inputs whose neutral value needs no support from it.
NEUTRAL = {"min_tokens": 0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


@dataclass
class Prepared:
    fields: dict[str, Any]
    prompt: str
    prompt_tokens: int
    max_tokens: int


@dataclass
class Result:
    text: str
    prompt: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Service:
    """The checkpoint's schema/template/tokenizer and the ensemble that serves it."""

    def __init__(self, model_dir: str | os.PathLike, grpc_url: str, *, triton_model: str = "steerlm",
                 served_name: str = "steerlm", cancel_socket: str | os.PathLike | None = None) -> None:
        self.builder = RequestBuilder(model_dir)
        self.spec = self.builder.spec
        self.ensemble = Ensemble(grpc_url, triton_model, cancel_socket=cancel_socket)
        self.served_name = served_name

    # -- requests -------------------------------------------------------------------------------------------
    def check_model(self, model: str | None, param: str = "model") -> None:
        if model is not None and model != self.served_name:
            raise ApiError(f"The model `{model}` does not exist; this server serves `{self.served_name}`.", param,
                           status=404, code="model_not_found")

    def parse_raw(self, prompt: str, param: str) -> ParsedPrompt:
        try:
            return parse_prompt(self.spec, prompt)
        except PromptParseError as exc:
            raise ApiError(f"{param}: not a valid SteerLM prompt for this model: {exc}", param) from None

    def is_raw(self, text: str) -> bool:
        return looks_raw(self.spec.template, text)

    def conversation_of(self, parsed: ParsedPrompt) -> Conversation:
        return Conversation(parsed.question, parsed.labels, parsed.system, parsed.history())

    async def prepare(self, conv: Conversation, sampling: Sampling, params: Mapping[str, str],
                      stream: bool) -> Prepared:
        """Validate and build the ensemble's fields. `params` maps ensemble field names to the request's own."""
        if not self.ensemble.inputs:
            await self._connect()
        knobs = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                 "seed": sampling.seed, **{name: getattr(sampling, name) for name in NEUTRAL}}
        try:
            built = self.builder.build(
                conv.question, sampling.max_tokens or 1, attributes=conv.labels, system=conv.system,
                history=json.dumps(conv.history) if conv.history else None, stop_words=sampling.stop,
                sampling=knobs)
        except RequestError as exc:
            field_name = str(exc).split(" ", 1)[0].rstrip(":")
            raise ApiError(str(exc), params.get(field_name, field_name)) from None
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            room = (self.builder.max_positions or len(built.input_ids) + 256) - len(built.input_ids)
            if room < 1:
                raise ApiError(f"the prompt is {len(built.input_ids)} tokens and fills the model's context",
                               params.get("text_input"))
            max_tokens = room
        fields: dict[str, Any] = {
            "text_input": conv.question, "max_tokens": max_tokens, "attributes": conv.labels,
            "system": conv.system, "history": json.dumps(conv.history) if conv.history else None,
            "stop_words": list(sampling.stop) or None, "stream": stream,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "seed": sampling.seed,
        }
        for name, neutral in NEUTRAL.items():
            value = getattr(sampling, name)
            if value == neutral:
                continue
            if not self.ensemble.supports(name):
                raise unsupported(params.get(name, name), f"the `{self.ensemble.model}` ensemble this API talks "
                                  f"to has no `{name}` input, so a value other than {neutral} cannot be honoured")
            fields[name] = value
        return Prepared(fields, built.prompt, len(built.input_ids), max_tokens)

    async def _connect(self) -> None:
        try:
            await self.ensemble.connect()
        except Exception as exc:  # noqa: BLE001 - any transport failure means the same to the caller
            raise ApiError(f"the Triton server at {self.ensemble.grpc_url} is not reachable: {exc}", None,
                           status=503, type="service_unavailable") from None

    # -- generation -----------------------------------------------------------------------------------------
    async def stream(self, prepared: Prepared) -> AsyncIterator[Piece]:
        """The ensemble's responses; leaving early cancels the request in Triton."""
        try:
            async for piece in self.ensemble.generate(prepared.fields):
                yield piece
        except EnsembleError as exc:
            raise ApiError(str(exc), None, status=400 if exc.bad_request else 502,
                           type="invalid_request_error" if exc.bad_request else "server_error") from None

    async def complete(self, prepared: Prepared) -> Result:
        tally = Tally(prepared)
        async for piece in self.stream(prepared):
            tally.add(piece)
        return tally.result()


class Tally:
    """Text, token counts and finish reason of one request, piece by piece."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.text: list[str] = []
        self.prompt = ""
        self.completion_tokens: int | None = None
        self.reason: str | None = None

    def add(self, piece: Piece) -> str:
        self.text.append(piece.text)
        self.prompt = self.prompt or piece.prompt
        if piece.num_output_tokens is not None:
            self.completion_tokens = piece.num_output_tokens
        self.reason = piece.finish_reason or self.reason
        return piece.text

    def tokens(self) -> int:
        if self.completion_tokens is None:
            raise ApiError("the ensemble did not report num_output_tokens (it predates return_num_output_tokens)",
                           None, status=502, type="server_error")
        return self.completion_tokens

    def finish_reason(self) -> str:
        if self.reason in ("stop", "length"):
            return self.reason
        return "length" if self.tokens() >= self.prepared.max_tokens else "stop"

    def usage(self) -> dict:
        return self.result().usage()

    def result(self) -> Result:
        return Result("".join(self.text), self.prompt or self.prepared.prompt, self.prepared.prompt_tokens,
                      self.tokens(), self.finish_reason())


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work` unless the HTTP client goes away first; then cancel it (which cancels the Triton request)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()

