"""An LLM-API-shaped facade over the CPU engine, so `LLMAPIEngine` runs for real in tests without a GPU.

It reproduces the parts of TensorRT-LLM's LLM API that `LLMAPIEngine` relies on, with upstream's names and
documented behaviour (NVIDIA/TensorRT-LLM tensorrt_llm/sampling_params.py, tensorrt_llm/executor/result.py,
tensorrt_llm/llmapi/llm.py):
- `SamplingParams` is a keyword-only dataclass with upstream's field names; an unknown name is a TypeError.
  `seed=None` is the runtime default 0; greedy when top_k is None/1 and top_p is None/0; `ignore_eos` turns
  the end id off; stop token ids end the sequence and are trimmed from the final output unless
  `include_stop_str_in_output`.
- `LLM.generate_async(prompt_token_ids, sampling_params, streaming)` returns a result that is async-iterable
  (items with `.outputs[0].token_ids` so far, `.outputs[0].finish_reason`, `.finished`), has `.abort()`
  (ends with finish_reason "cancelled") and raises the engine's error from the iteration.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from steerlm import generation


class RequestError(RuntimeError):
    """Upstream raises tensorrt_llm.executor.utils.RequestError from a failed request's result."""


@dataclass(kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad_token_ids: list[int] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logits_processor: Any = None
    n: int = 1
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    detokenize: bool = True


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


class GenerationResult:
    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams, streaming: bool) -> None:
        self.request_id = request_id
        self._prompt = prompt
        self._params = params
        self._streaming = streaming
        self._loop = asyncio.get_running_loop()  # upstream, too, binds a result to the caller's loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tokens: list[int] = []
        self._done = False
        self._aborted = threading.Event()
        self.engine_tokens = 0  # tokens the CPU engine produced for this request, after an abort too

    # called on the CPU engine's thread
    def on_tokens(self, new: list[int], final: bool) -> None:
        self.engine_tokens += len(new)
        self._put(("tokens", list(new), final))

    def on_error(self, message: str) -> None:
        self._put(("error", message, True))

    def _put(self, item: tuple) -> None:
        if not self._loop.is_closed():  # nobody listens to a request after its caller's loop has ended
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def is_aborted(self) -> bool:
        return self._aborted.is_set()

    def abort(self) -> None:
        self._aborted.set()
        self._put(("cancelled", [], True))

    def aborted(self) -> bool:
        return self._aborted.is_set()

    @property
    def finished(self) -> bool:
        return self._done

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._done:
                raise StopAsyncIteration
            kind, payload, final = await self._queue.get()
            if kind == "error":
                self._done = True
                raise RequestError(payload)
            reason = None
            if kind == "cancelled":
                reason = "cancelled"
            else:
                self._tokens.extend(payload)
                if final:
                    reason = self._finish_reason()
            self._done = final
            if self._streaming or final:
                return RequestOutput(self.request_id, self._prompt,
                                     [CompletionOutput(0, list(self._tokens), reason)], final)

    def _finish_reason(self) -> str:
        params = self._params
        if params.stop_token_ids and self._tokens and self._tokens[-1] in params.stop_token_ids:
            if not params.include_stop_str_in_output:
                self._tokens.pop()
            return "stop"
        return "length" if len(self._tokens) >= params.max_tokens else "stop"


class LLM:
    """`LLM(model, **kwargs)`: the CPU engine of steerlm.generation behind the LLM API's surface."""

    def __init__(self, model: str, tokenizer: str | None = None, max_batch_size: int = 8, **kwargs: Any) -> None:
        self.args = {"model": model, "tokenizer": tokenizer, "max_batch_size": max_batch_size, **kwargs}
        self.engine = generation.Engine(model, max_batch_size=max_batch_size)
        self.submitted: list[SamplingParams] = []
        self.results: list[GenerationResult] = []
        self._next_id = 0
        self.shut_down = False

    def generate_async(self, inputs: list[int], sampling_params: SamplingParams | None = None,
                       streaming: bool = False) -> GenerationResult:
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("the facade generates one sequence per request")
        bad = [[t] for t in params.bad_token_ids or []]
        if params.logits_processor is not None:
            # The CPU engine has no logits hook; BannedSequences (the only processor LLMAPIEngine sends) maps
            # onto its bad words exactly.
            bad += [list(w) for w in params.logits_processor.words]
        greedy = (params.top_k in (None, 1)) and (params.top_p in (None, 0.0))
        cpu = generation.SamplingParams(
            max_tokens=params.max_tokens,
            end_id=None if params.ignore_eos else params.end_id,
            temperature=1.0 if params.temperature is None else params.temperature,
            top_k=1 if greedy else (params.top_k or 0),
            top_p=params.top_p or 0.0,
            seed=0 if params.seed is None else params.seed,
            stop_words=[[t] for t in params.stop_token_ids or []],
            bad_words=bad,
            min_tokens=params.min_tokens or 0,
            repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
            presence_penalty=params.presence_penalty or 0.0,
            frequency_penalty=params.frequency_penalty or 0.0,
        )
        self._next_id += 1
        result = GenerationResult(self._next_id, list(inputs), params, streaming)
        self.submitted.append(params)
        self.results.append(result)
        self.engine.submit(generation.GenerationRequest(list(inputs), cpu, result.on_tokens, stream=True,
                                                        fail=result.on_error, cancelled=result.is_aborted))
        return result

    def shutdown(self) -> None:
        if not self.shut_down:
            self.shut_down = True
            self.engine.close()
