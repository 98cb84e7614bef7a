"""POST /v1/completions: OpenAI's (legacy) completions API.

`prompt` is either a question (plain text, rendered by the template with `attributes`, `system`) or a whole
raw SteerLM prompt as the model cards build it, which is accepted only if it parses strictly back into a
conversation that re-renders byte for byte (`steerlm.rawprompt`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from steerlm.api.errors import ApiError, unsupported
from steerlm.api.openai_common import (
    PARAMS,
    OpenAIRequest,
    created,
    event_stream,
    label_form,
    new_id,
    response_envelope,
)
from steerlm.api.service import Conversation, Service, until_disconnected

router = APIRouter()

PROMPT_PARAMS = {**PARAMS, "text_input": "prompt", "history": "prompt"}


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this route
    system: str | None = None  # SteerLM: system prompt for a plain-text prompt
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs is not None:
            raise unsupported("logprobs", "log probabilities are not returned by this server")
        if self.echo:
            raise unsupported("echo", "echoing the prompt is not supported")
        if self.suffix:
            raise unsupported("suffix", "insertion (suffix) is not supported by SteerLM models")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", f"this server returns one choice per request, got best_of={self.best_of}")
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise unsupported("prompt", f"one prompt per request, got a list of {len(self.prompt)}")

    def text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


def conversation(service: Service, req: CompletionRequest) -> Conversation:
    prompt = req.text()
    if not service.is_raw(prompt):
        return Conversation(prompt, label_form(req.attributes, "attributes"), req.system)
    for name in ("attributes", "system"):
        if getattr(req, name) is not None:
            raise ApiError(f"{name}: a raw SteerLM prompt carries its own {name}; give either a raw prompt or a "
                           f"plain question with {name}", name)
    return service.conversation_of(service.parse_raw(prompt, "prompt"))


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    service: Service = request.app.state.service
    service.check_model(req.model)
    req.refuse_unsupported()
    prepared = await service.prepare(conversation(service, req), req.sampling(req.max_tokens), PROMPT_PARAMS,
                                     req.stream)
    rid, ts = new_id("cmpl"), created()

    if req.stream:
        envelope = response_envelope(rid, ts, "text_completion", service.served_name, req.include_usage)

        def chunk(text: str | None, finish: str | None) -> dict:
            return envelope([{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}])

        usage_chunk = (lambda usage: envelope([], usage)) if req.include_usage else None
        return StreamingResponse(event_stream(service, prepared, first=None, chunk=chunk, usage_chunk=usage_chunk),
                                 media_type="text/event-stream")

    result = await until_disconnected(request, service.complete(prepared))
    whole = response_envelope(rid, ts, "text_completion", service.served_name)
    return whole([{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}],
                 result.usage())
