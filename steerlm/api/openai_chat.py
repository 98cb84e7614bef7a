"""POST /v1/chat/completions: OpenAI's chat API on the SteerLM template.

The system message is the system prompt; earlier user/assistant pairs are the history (an assistant message
may carry the `attributes` it was written with); the last user message is the question. The conversation is
rendered by the checkpoint's template with user text kept apart from control tokens, never as raw text.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from steerlm.api.errors import ApiError, unsupported
from steerlm.api.openai_common import (
    PARAMS,
    Attributes,
    OpenAIRequest,
    created,
    event_stream,
    label_form,
    new_id,
    response_envelope,
)
from steerlm.api.service import Conversation, Service, until_disconnected
from steerlm.schema import SchemaError

router = APIRouter()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    # SteerLM: the attributes an earlier assistant answer was written with (default: the model's defaults).
    attributes: Attributes = None
    tool_calls: list[Any] | None = None


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise unsupported("logprobs", "log probabilities are not returned by this server")
        if self.top_logprobs:
            raise unsupported("top_logprobs", "log probabilities are not returned by this server")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise unsupported(name, "tool and function calling is not supported by SteerLM models")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise unsupported(name, "tool and function calling is not supported by SteerLM models")
        if self.response_format and self.response_format.get("type") != "text":
            raise unsupported("response_format", "only {\"type\": \"text\"} is supported")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError("max_tokens and max_completion_tokens differ; give one of them", "max_completion_tokens")


def _text(msg: ChatMessage, i: int) -> str:
    if isinstance(msg.content, str):
        return msg.content
    if msg.content is None:
        raise ApiError(f"messages[{i}].content: a {msg.role} message needs text content", f"messages[{i}].content")
    parts = []
    for j, part in enumerate(msg.content):
        if part.type != "text" or part.text is None:
            raise unsupported(f"messages[{i}].content[{j}]", f"content of type {part.type!r} is not supported; "
                              "SteerLM models take text parts only")
        parts.append(part.text)
    return "".join(parts)


def conversation(service: Service, req: ChatCompletionRequest) -> Conversation:
    """System prompt, earlier turns and the question of a chat request, checked message by message."""
    messages = list(enumerate(req.messages))
    system = None
    if messages[0][1].role in ("system", "developer"):
        system = _text(messages[0][1], 0)
        messages = messages[1:]
    history: list[dict] = []
    question: str | None = None
    for i, msg in messages:
        expected = "user" if question is None else "assistant"
        if msg.role in ("tool", "function") or msg.tool_calls:
            raise unsupported(f"messages[{i}]", "tool and function messages are not supported by SteerLM models")
        if msg.role != expected:
            where = "only as the first message" if msg.role in ("system", "developer") else "here"
            raise ApiError(f"messages[{i}].role: expected a {expected} message, got {msg.role!r} (a system message "
                           f"may appear {where}; user and assistant messages alternate, ending with a user message)",
                           f"messages[{i}].role")
        if msg.attributes is not None and msg.role != "assistant":
            raise ApiError(f"messages[{i}].attributes: only assistant messages carry attributes (the attributes of "
                           "the answer you ask for go at the top level)", f"messages[{i}].attributes")
        if msg.role == "user":
            question = _text(msg, i)
            continue
        labels = label_form(msg.attributes, f"messages[{i}].attributes")
        try:
            labels = service.spec.schema.encode(service.spec.schema.parse(labels or ""))
        except SchemaError as exc:
            raise ApiError(f"messages[{i}].attributes: {exc}", f"messages[{i}].attributes") from None
        history.append({"question": question, "answer": _text(msg, i), "labels": labels})
        question = None
    if question is None:
        last = messages[-1][0] if messages else 0
        raise ApiError(f"messages[{last}]: the last message must be a user message (the question to answer)",
                       f"messages[{last}]")
    return Conversation(question, label_form(req.attributes, "attributes"), system, history)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    service: Service = request.app.state.service
    service.check_model(req.model)
    req.refuse_unsupported()
    conv = conversation(service, req)
    prepared = await service.prepare(conv, req.sampling(req.max_completion_tokens or req.max_tokens), PARAMS,
                                     req.stream)
    rid, ts = new_id("chatcmpl"), created()

    if req.stream:
        envelope = response_envelope(rid, ts, "chat.completion.chunk", service.served_name, req.include_usage)

        def chunk(text: str | None, finish: str | None) -> dict:
            delta = {} if text is None else {"content": text}
            return envelope([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

        first = envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}])
        usage_chunk = (lambda usage: envelope([], usage)) if req.include_usage else None
        return StreamingResponse(event_stream(service, prepared, first=first, chunk=chunk, usage_chunk=usage_chunk),
                                 media_type="text/event-stream")

    result = await until_disconnected(request, service.complete(prepared))
    whole = response_envelope(rid, ts, "chat.completion", service.served_name)
    return whole([{"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                   "logprobs": None, "finish_reason": result.finish_reason}], result.usage())
