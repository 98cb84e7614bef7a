"""What the two OpenAI routes share: request fields, refusals, sampling, attributes and the SSE stream."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from steerlm.api.errors import ApiError, unsupported
from steerlm.api.service import Prepared, Sampling, Service, Tally

Attributes = dict[str, Any] | str | None


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """Fields both /v1/chat/completions and /v1/completions take (OpenAI's names and ranges)."""

    # Unknown fields are ignored, as vLLM and trtllm-serve do; fields this server cannot honour are refused below.
    model_config = ConfigDict(extra="ignore")

    model: str
    # SteerLM: {"verbosity": 4} or "verbosity:4,creativity:1"; attributes left out take the model's defaults.
    attributes: Attributes = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise unsupported("n", f"this server returns one choice per request (n=1), got n={self.n}")
        if self.logit_bias:
            raise unsupported("logit_bias", "not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ApiError("stream_options: only allowed when stream is true", "stream_options")
        stop = self.stop_list()
        if len(stop) > 4:
            raise ApiError(f"stop: at most 4 stop sequences, got {len(stop)}", "stop")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_tokens: int | None) -> Sampling:
        """OpenAI's sampling as TensorRT-LLM's: temperature 0 is greedy (top_k 1); otherwise sampling with
        temperature (default 1) over top_p (default 1, the whole distribution) and top_k when given."""
        greedy = self.temperature == 0
        return Sampling(
            max_tokens=max_tokens,
            temperature=None if greedy else (1.0 if self.temperature is None else self.temperature),
            top_p=None if greedy else (1.0 if self.top_p is None else self.top_p),
            top_k=1 if greedy else self.top_k,
            seed=self.seed,
            stop=self.stop_list(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PARAMS = {"attributes": "attributes", "max_tokens": "max_tokens", "history": "messages", "text_input": "messages",
          "stop_words": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def label_form(value: Attributes, param: str) -> str | None:
    """{"verbosity": 4} -> "verbosity:4"; a label string passes through (the schema validates both)."""
    if value is None or isinstance(value, str):
        return value or None
    for name in value:
        if not isinstance(name, str) or not name:
            raise ApiError(f"{param}: attribute names must be non-empty strings", param)
    return ",".join(f"{k}:{json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()) or None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj: Mapping | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def event_stream(service: Service, prepared: Prepared, *, first: dict | None,
                       chunk: Callable[[str | None, str | None], dict], usage_chunk: Callable[[dict], dict] | None,
                       ) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

    An error after the response has started is sent as an `{"error": ...}` event (what OpenAI's client raises
    as APIError). A client that disconnects cancels this generator, and with it the Triton request."""
    tally = Tally(prepared)
    try:
        if first is not None:
            yield sse(first)
        async for piece in service.stream(prepared):
            text = tally.add(piece)
            if text:
                yield sse(chunk(text, None))
        yield sse(chunk(None, tally.finish_reason()))
        if usage_chunk is not None:
            yield sse(usage_chunk(tally.usage()))
    except ApiError as exc:
        yield sse(exc.body())
    yield sse("[DONE]")


def created() -> int:
    return int(time.time())


def response_envelope(rid: str, ts: int, obj: str, model: str, include_usage: bool = True) -> Callable[..., dict]:
    """The outer object of every response (whole or chunk) of one request; `usage` goes in only when wanted
    (always in whole answers, with stream_options.include_usage in chunks)."""

    def wrap(choices: list, usage: dict | None = None) -> dict:
        out = {"id": rid, "object": obj, "created": ts, "model": model, "system_fingerprint": None,
               "choices": choices}
        if include_usage:
            out["usage"] = usage
        return out

    return wrap
