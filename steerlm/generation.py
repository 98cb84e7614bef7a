"""A small in-flight-batching generation engine on PyTorch (the CPU stand-in for TensorRT-LLM).

Requests are prefilled alone and then join one running batch; every decode step advances all of them
together. The batch keeps one KV cache, left-padded to a common length; it is re-laid out only when a
request joins or leaves. Semantics follow TensorRT-LLM's sampling: greedy unless top_k > 1 or top_p is set;
the end id ends a sequence and is not returned; stop words end it and are returned.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

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

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1 or (self.top_k <= 0 and self.top_p <= 0)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    # emit(new_token_ids, final): called with each token while streaming, else once with all tokens.
    emit: Callable[[list[int], bool], None]
    stream: bool = False
    fail: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None


class _Seq:
    def __init__(self, req: GenerationRequest) -> None:
        self.req = req
        self.tokens: list[int] = []
        self.gen: torch.Generator | None = None
        if not req.params.greedy:
            self.gen = torch.Generator().manual_seed(
                req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            )

    @property
    def length(self) -> int:
        """Positions in the KV cache: the prompt and every generated token but the newest (not yet fed back)."""
        return len(self.req.prompt_ids) + len(self.tokens) - 1

    def banned(self) -> list[int]:
        """Last tokens of bad words whose other tokens were just generated."""
        out = []
        for w in self.req.params.bad_words:
            if w and (len(w) == 1 or self.tokens[-(len(w) - 1):] == w[:-1]):
                out.append(w[-1])
        return out

    def stopped(self) -> bool:
        return any(w and self.tokens[-len(w):] == w for w in self.req.params.stop_words)


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id from a [vocab] row of logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < params.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least the most likely one).
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= params.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    """Runs a Hugging Face causal LM for many concurrent requests on a background thread."""

    def __init__(self, model_dir: str | os.PathLike, *, max_batch_size: int = 8, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._rows: list[_Seq] = []
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer [B, heads, width, dim]
        self._pads: list[int] = []  # left padding of each row
        self._thread = threading.Thread(target=self._loop, name="steerlm-engine", daemon=True)
        self._closed = False
        self._thread.start()

    # -- public ---------------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        if self._closed:
            raise RuntimeError("engine is closed")
        self._queue.put(request)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """Blocking convenience: the generated token ids of one request."""
        done = threading.Event()
        result: list[int] = []
        errors: list[str] = []

        def emit(tokens: list[int], final: bool) -> None:
            result.extend(tokens)
            if final:
                done.set()

        def fail(msg: str) -> None:
            errors.append(msg)
            done.set()

        self.submit(GenerationRequest(list(prompt_ids), params, emit, fail=fail))
        done.wait()
        if errors:
            raise RuntimeError(errors[0])
        return result

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    # -- loop -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loop(self) -> None:
        # Grad mode is per thread, so this thread (where all model calls run) sets it for itself.
        while True:
            try:
                # Block only when idle; otherwise take whatever arrived since the last step.
                while len(self._rows) < self.max_batch_size:
                    item = self._queue.get(block=not self._rows)
                    if item is None:
                        self._fail_all("server is shutting down")
                        return
                    self._admit(item)
            except queue.Empty:
                pass
            if self._rows:
                try:
                    self._step()
                except Exception as exc:  # a failed step must not take the server down
                    log.exception("decode step failed")
                    self._fail_all(f"generation failed: {exc}")

    def _fail_all(self, msg: str) -> None:
        for seq in self._rows:
            _fail(seq.req, msg)
        self._rows, self._cache, self._pads = [], [], []

    def _admit(self, req: GenerationRequest) -> None:
        try:
            if not req.prompt_ids:
                raise ValueError("input_ids is empty")
            if self.max_positions and len(req.prompt_ids) + req.params.max_tokens > self.max_positions:
                raise ValueError(f"input length {len(req.prompt_ids)} + request_output_len "
                                 f"{req.params.max_tokens} exceeds the model's {self.max_positions} positions")
            seq = _Seq(req)
            ids = torch.tensor([req.prompt_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
            cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            if self._advance(seq, out.logits[0, -1]):
                self._join(seq, cache)
        except Exception as exc:
            log.exception("prefill failed")
            _fail(req, str(exc))

    def _advance(self, seq: _Seq, logits: torch.Tensor) -> bool:
        """Sample the next token of `seq` and deliver it; False when the sequence is finished."""
        req, params = seq.req, seq.req.params
        banned = seq.banned()
        if banned:
            logits = logits.clone()
            logits[banned] = float("-inf")
        token = sample(logits, params, seq.gen)
        if req.cancelled is not None and req.cancelled():
            return False
        if token == params.end_id:
            self._deliver(seq, [], final=True)
            return False
        seq.tokens.append(token)
        final = len(seq.tokens) >= params.max_tokens or seq.stopped()
        self._deliver(seq, [token], final)
        return not final

    def _deliver(self, seq: _Seq, new: list[int], final: bool) -> None:
        req = seq.req
        try:
            if req.stream:
                if new:
                    req.emit(new, False)
                if final:
                    # The C++ backend also ends a stream with a response of its own.
                    req.emit([], True)
            elif final:
                req.emit(list(seq.tokens), True)
        except Exception:
            log.exception("could not deliver tokens")

    # -- batched KV cache -----------------------------------------------------------------------------------
    def _join(self, seq: _Seq, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        width = self._cache[0][0].shape[2] if self._cache else 0
        new_width = max(width, seq.length)
        grown = []
        for li, (k, v) in enumerate(cache):
            k, v = _left_pad(k, new_width), _left_pad(v, new_width)
            if self._cache:
                bk, bv = self._cache[li]
                k = torch.cat([_left_pad(bk, new_width), k])
                v = torch.cat([_left_pad(bv, new_width), v])
            grown.append((k, v))
        self._pads = [p + new_width - width for p in self._pads] + [new_width - seq.length]
        self._cache = grown
        self._rows.append(seq)

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._pads = [], [], []
            return
        idx = torch.tensor(keep, device=self.device)
        trim = min(self._pads[i] for i in keep)  # columns that are padding in every remaining row
        self._cache = [(k.index_select(0, idx)[:, :, trim:], v.index_select(0, idx)[:, :, trim:])
                       for k, v in self._cache]
        self._rows = [self._rows[i] for i in keep]
        self._pads = [self._pads[i] - trim for i in keep]

    def _step(self) -> None:
        from transformers import DynamicCache

        width = self._cache[0][0].shape[2]
        rows = len(self._rows)
        last = torch.tensor([[s.tokens[-1]] for s in self._rows], device=self.device)
        mask = torch.ones(rows, width + 1, dtype=torch.long, device=self.device)
        for i, p in enumerate(self._pads):
            mask[i, :p] = 0
        positions = torch.tensor([[s.length] for s in self._rows], device=self.device)
        cache = DynamicCache(self._cache, config=self.model.config)
        out = self.model(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True)
        self._cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        keep = []
        for i, seq in enumerate(self._rows):
            if self._advance(seq, out.logits[i, -1]):
                keep.append(i)
        if len(keep) < rows:
            self._keep(keep)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[2]
    if missing <= 0:
        return t
    pad = torch.zeros(t.shape[0], t.shape[1], missing, t.shape[3], dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


def _fail(req: GenerationRequest, msg: str) -> None:
    if req.fail is not None:
        try:
            req.fail(msg)
        except Exception:
            log.exception("could not report a failure")
