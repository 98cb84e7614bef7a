"""The request side of the generation engine protocol (torch-free, so request validation can use it anywhere).

`steerlm.generation.Engine` and every other engine (TensorRT-LLM's LLM API) take `GenerationRequest`s."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_tokens: int
    end_id: int | None = None
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 0.0  # 0: not set
    seed: int | None = None
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    min_tokens: int = 0  # the end id is not sampled before this many tokens
    repetition_penalty: float = 1.0  # over prompt and output tokens (1: off)
    presence_penalty: float = 0.0  # over output tokens, once per distinct token (0: off)
    frequency_penalty: float = 0.0  # over output tokens, per occurrence (0: off)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1 or (self.top_k <= 0 and self.top_p <= 0)

    def problem(self) -> str | None:
        """What is wrong with these parameters (naming the field and what it allows), or None."""
        def finite(name: str, low: float | None = None) -> str | None:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or (low is not None and value < low):
                bound = f" >= {low:g}" if low is not None else ""
                return f"{name} must be a finite number{bound}, got {value!r}"
            return None

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            return f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
        checks = [finite("temperature", 0), finite("repetition_penalty"), finite("presence_penalty"),
                  finite("frequency_penalty")]
        if self.repetition_penalty <= 0:
            checks.append(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not (isinstance(self.top_p, (int, float)) and math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            checks.append(f"top_p must be in (0, 1] (0 or left out: not set), got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            checks.append(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            checks.append(f"seed must be an integer in 0..2^64-1, got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            checks.append(f"min_tokens must be an integer in 0..max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        return next((c for c in checks if c), None)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    # emit(new_token_ids, final): called with each token while streaming, else once with all tokens.
    emit: Callable[[list[int], bool], None]
    stream: bool = False
    fail: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None

    def deliver(self, tokens: list[int], new: list[int], final: bool) -> None:
        """Hand the caller `new` tokens (streaming) or all `tokens` once final; a failing callback is logged, since
        one broken client must not stop an engine serving the others."""
        try:
            if self.stream:
                if new:
                    self.emit(new, False)
                if final:
                    # The C++ backend also ends a stream with a response of its own.
                    self.emit([], True)
            elif final:
                self.emit(list(tokens), True)
        except Exception:
            log.exception("could not deliver tokens")

    def report_failure(self, msg: str) -> None:
        """End the request with `msg` through its `fail` callback, if it has one (a failing callback is logged)."""
        if self.fail is not None:
            try:
                self.fail(msg)
            except Exception:
                log.exception("could not report a failure")
