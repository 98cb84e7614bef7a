"""PUT (and POST) /generate: NeMo's megatron_gpt_eval text generation server, as the SteerLM 13B card calls it.

Field names, defaults and ranges follow NeMo's `MegatronGenerate.put` (NVIDIA/NeMo,
nemo/collections/nlp/modules/common/text_generation_server.py, v1.17.0 and later). Each sentence is a raw
SteerLM prompt, parsed strictly (`steerlm.rawprompt`); the answer ends at the model's own stop strings and at
`end_strings`, none of which it contains; `sentences` echo each prompt followed by its answer, so the cards'
`json_response["sentences"][0][len(prompt):]` is the answer.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from steerlm.api.errors import ApiError, unsupported
from steerlm.api.service import Sampling, Service, until_disconnected

router = APIRouter()

PARAMS = {"max_tokens": "tokens_to_generate", "stop_words": "end_strings", "min_tokens": "min_tokens_to_generate",
          "repetition_penalty": "repetition_penalty"}


class NemoGenerateRequest(BaseModel):
    # NeMo logs unknown keys and goes on; so does this route.
    model_config = ConfigDict(extra="ignore")

    sentences: list[str] = Field(min_length=1, max_length=128)
    tokens_to_generate: int = Field(64, ge=1)
    all_probs: bool = False
    temperature: float = Field(1.0, gt=0, le=100)
    add_BOS: bool = False
    greedy: bool = False
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.9, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=1)
    end_strings: list[str] = ["<|endoftext|>"]
    min_tokens_to_generate: int = Field(0, ge=0)
    compute_logprob: bool = False
    random_seed: int | None = Field(None, ge=0, lt=2**64)

    def refuse_unsupported(self) -> None:
        if self.all_probs:
            raise unsupported("all_probs", "log probabilities are not returned by this server")
        if self.compute_logprob:
            raise unsupported("compute_logprob", "log probabilities are not returned by this server")
        if self.add_BOS:
            raise unsupported("add_BOS", "SteerLM prompts are tokenized without a BOS token, as in training")

    def sampling(self) -> Sampling:
        """NeMo's sampling as TensorRT-LLM's: greedy (or top_k 1) is top_k 1; NeMo samples the whole
        distribution when neither top_k nor top_p is set, where TensorRT-LLM would be greedy, hence top_p 1."""
        greedy = self.greedy or self.top_k == 1
        return Sampling(
            max_tokens=self.tokens_to_generate,
            temperature=None if greedy else self.temperature,
            top_k=1 if greedy else (self.top_k or None),
            top_p=None if greedy else (self.top_p or (None if self.top_k else 1.0)),
            seed=self.random_seed,
            stop=[s for s in self.end_strings if s],
            min_tokens=self.min_tokens_to_generate,
            repetition_penalty=self.repetition_penalty,
        )


async def _all(service: Service, prepared: list) -> list:
    """Every sentence's result; one failing cancels the others (a TaskGroup does, gather would not)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(service.complete(p)) for p in prepared]
    except ExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return [t.result() for t in tasks]


async def _generate(request: Request, req: NemoGenerateRequest) -> dict:
    service: Service = request.app.state.service
    req.refuse_unsupported()
    prepared = []
    for i, sentence in enumerate(req.sentences):
        conv = service.conversation_of(service.parse_raw(sentence, f"sentences[{i}]"))
        params = {**PARAMS, "text_input": f"sentences[{i}]", "history": f"sentences[{i}]",
                  "attributes": f"sentences[{i}]"}
        prepared.append(await service.prepare(conv, req.sampling(), params, stream=False))
    results = await until_disconnected(request, _all(service, prepared))
    for sentence, result in zip(req.sentences, results):
        if result.prompt != sentence:  # the parser's byte-identity promise, checked against the ensemble's render
            raise ApiError("the ensemble rendered a different prompt than the one sent", None, status=500,
                           type="server_error")
    return {"sentences": [s + r.text for s, r in zip(req.sentences, results)]}


@router.api_route("/generate", methods=["PUT", "POST"])
async def generate(req: NemoGenerateRequest, request: Request) -> dict:
    return await _generate(request, req)
