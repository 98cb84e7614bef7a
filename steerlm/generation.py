"""A small in-flight-batching generation engine on PyTorch (the CPU stand-in for TensorRT-LLM).

Requests are prefilled alone and then join one running batch; every decode step advances all of them
together. The batch keeps one KV cache, left-padded to a common length; it is re-laid out only when a
request joins or leaves. Semantics follow TensorRT-LLM's sampling: greedy unless top_k > 1 or top_p is set;
the end id ends a sequence and is not returned; stop words end it and are returned.

Isolation: parameters are checked (`SamplingParams.problem`) before a request joins the batch, and sampling
runs per row, so a row that still fails ends only its own request. Cancellation: `cancelled()` is polled
before every decode step and a cancelled row leaves the batch before the next one. `steps`, `tokens` and
`last_progress` let the serving layer export metrics and notice a stalled engine.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Sequence

import torch

from steerlm.sampling import GenerationRequest, SamplingParams

__all__ = ["Engine", "GenerationRequest", "SamplingParams", "sample"]

log = logging.getLogger(__name__)


class _Seq:
    def __init__(self, req: GenerationRequest, device: str = "cpu") -> None:
        self.req = req
        self.tokens: list[int] = []
        self.gen: torch.Generator | None = None
        if not req.params.greedy:
            seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(8), "little")
            # On the device of the logits: multinomial takes a generator of its own device only.
            self.gen = torch.Generator(device=device).manual_seed(seed % 2**63)

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

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits after bad words, min_tokens and penalties (NaN never reaches sampling)."""
        params = self.req.params
        logits = torch.nan_to_num(logits.float(), nan=float("-inf"))
        banned = self.banned()
        if params.end_id is not None and len(self.tokens) < params.min_tokens:
            banned.append(params.end_id)
        if banned:
            logits[banned] = float("-inf")
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(self.req.prompt_ids) | set(self.tokens)), dtype=torch.long,
                                device=logits.device)
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                       picked * params.repetition_penalty)
        if self.tokens and (params.presence_penalty or params.frequency_penalty):
            ids, counts = torch.tensor(self.tokens, device=logits.device).unique(return_counts=True)
            logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.float()
        return logits


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id from a [vocab] row of logits."""
    if not bool(torch.isfinite(logits).any()):
        raise ValueError("every token is excluded (bad_words/min_tokens leave nothing to sample)")
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
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise ValueError("sampling probabilities are not finite")
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    """Runs a Hugging Face causal LM for many concurrent requests on a background thread."""

    def __init__(self, model_dir: str | os.PathLike, *, max_batch_size: int = 8, device: str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        from transformers import AutoModelForCausalLM

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r}: this PyTorch build sees no CUDA device")
        if dtype is None:  # bf16 on GPUs (what the checkpoints are trained in), fp32 on CPU
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device
        # Counters read by other threads (metrics, stall watchdog); plain ints/floats, written by the loop only.
        self.steps = 0  # decode steps and prefills run
        self.tokens = 0  # tokens sampled
        self.last_progress = time.monotonic()
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

    @property
    def running(self) -> int:
        """Rows in the batch now."""
        return len(self._rows)

    def pending(self) -> int:
        """Requests running or waiting to join."""
        return len(self._rows) + self._queue.qsize()

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
            self._drop_cancelled()
            if self._rows:
                try:
                    self._step()
                except Exception as exc:  # a failed step must not take the server down
                    log.exception("decode step failed")
                    self._fail_all(f"generation failed: {exc}")

    def _fail_all(self, msg: str) -> None:
        for seq in self._rows:
            seq.req.report_failure(msg)
        self._rows, self._cache, self._pads = [], [], []

    def _drop_cancelled(self) -> None:
        keep = [i for i, seq in enumerate(self._rows) if not _is_cancelled(seq.req)]
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _admit(self, req: GenerationRequest) -> None:
        if _is_cancelled(req):
            return
        problem = req.params.problem()
        if problem:
            req.report_failure(problem)
            return
        try:
            if not req.prompt_ids:
                raise ValueError("input_ids is empty")
            if self.max_positions and len(req.prompt_ids) + req.params.max_tokens > self.max_positions:
                raise ValueError(f"input length {len(req.prompt_ids)} + request_output_len "
                                 f"{req.params.max_tokens} exceeds the model's {self.max_positions} positions")
            seq = _Seq(req, self.device)
            ids = torch.tensor([req.prompt_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
            self._progress()
            cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            if self._advance(seq, out.logits[0, -1]):
                self._join(seq, cache)
        except Exception as exc:
            log.exception("prefill failed")
            req.report_failure(str(exc))

    def _progress(self) -> None:
        self.steps += 1
        self.last_progress = time.monotonic()

    def _advance(self, seq: _Seq, logits: torch.Tensor) -> bool:
        """Sample the next token of `seq` and deliver it; False when the sequence is finished.

        A failure here (sampling) ends this request only."""
        req, params = seq.req, seq.req.params
        if _is_cancelled(req):
            return False
        try:
            token = sample(seq.adjust(logits), params, seq.gen)
        except Exception as exc:
            req.report_failure(f"sampling failed: {exc}")
            return False
        self.tokens += 1
        if token == params.end_id:
            req.deliver(seq.tokens, [], final=True)
            return False
        seq.tokens.append(token)
        final = len(seq.tokens) >= params.max_tokens or seq.stopped()
        req.deliver(seq.tokens, [token], final)
        return not final

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
        self._progress()
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


def _is_cancelled(req: GenerationRequest) -> bool:
    try:
        return req.cancelled is not None and bool(req.cancelled())
    except Exception:
        log.exception("cancelled() failed; dropping the request")
        return True

