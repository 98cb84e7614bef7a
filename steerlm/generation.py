"""A small in-flight-batching generation engine on PyTorch (the CPU stand-in for TensorRT-LLM).

Requests that arrive while others run are prefilled together in one forward (within a token budget) and join
the running batch between two decode steps; every decode step advances all rows together. The batch keeps one
KV cache, its rows left-padded to a common length in a slab allocated ahead in time, so a decode step writes in
place; the slab is rebuilt only when rows join or leave or it runs out of room. Semantics follow TensorRT-LLM's
sampling: greedy unless top_k > 1 or top_p is set; the end id ends a sequence and is not returned; stop words
end it and are returned.

Isolation: parameters are checked (`SamplingParams.problem`) before a request is prefilled; a prefill forward
that fails is retried one request at a time, and sampling runs per row, so a request that still fails ends
only itself. Cancellation: `cancelled()` is polled before every decode step and a cancelled row leaves the
batch before the next one. `steps`, `tokens` and `last_progress` let the serving layer export metrics and
notice a stalled engine.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from steerlm.sampling import GenerationRequest, SamplingParams

__all__ = ["Engine", "GenerationRequest", "PREFILL_TOKENS", "SamplingParams", "sample"]

log = logging.getLogger(__name__)

# Padded prompt tokens one prefill forward may hold (rows x longest prompt among them): vLLM's default
# max_num_batched_tokens (vllm/config/scheduler.py, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS). A longer
# prompt is still prefilled, alone.
PREFILL_TOKENS = 2048
_SPARE_COLUMNS = 64  # least room ahead a rebuilt KV slab gets (beyond that it at most doubles)


class _Seq:
    def __init__(self, req: GenerationRequest, device: str = "cpu") -> None:
        self.req = req
        self.tokens: list[int] = []
        self.done = False  # finished, failed or cancelled: leaves the batch before the next step
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


class _SlabLayer(DynamicLayer):
    """One layer's keys and values for the running batch, [rows, kv heads, capacity, head dim], allocated ahead in
    time: a decode step writes its column in place (a DynamicCache concatenates, copying the whole cache)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        super().__init__()
        self.keys, self.values, self.width = keys, values, width
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.width + key_states.shape[2]
        self.keys[:, :, self.width:end] = key_states
        self.values[:, :, self.width:end] = value_states
        self.width = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width + query_length, 0


class Engine:
    """Runs a Hugging Face causal LM for many concurrent requests on a background thread.

    `max_prefill_tokens` bounds one prefill forward (rows x longest prompt among them). Between two decode steps
    the engine runs at most one prefill, so a burst of long prompts delays the running rows by one such forward
    at a time, not by all of them at once."""

    def __init__(self, model_dir: str | os.PathLike, *, max_batch_size: int = 8, device: str = "cpu",
                 dtype: torch.dtype | None = None, max_prefill_tokens: int = PREFILL_TOKENS) -> None:
        from transformers import AutoModelForCausalLM

        if isinstance(max_prefill_tokens, bool) or not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be an integer >= 1, got {max_prefill_tokens!r}")
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
        self.max_prefill_tokens = max_prefill_tokens
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._waiting: list[GenerationRequest] = []  # taken from the queue, not prefilled yet
        # The batch: its rows (a list replaced, never changed in place: other threads count it), the left padding
        # of each row, and the KV slab (one _SlabLayer per model layer; every row ends at the slab's width).
        self._rows: list[_Seq] = []
        self._pads: list[int] = []
        self._kv: Cache | None = None
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
        return sum(not seq.done for seq in self._rows)

    def pending(self) -> int:
        """Requests running or waiting to join."""
        return self.running + len(self._waiting) + self._queue.qsize()

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
                while self.running + len(self._waiting) < self.max_batch_size:
                    item = self._queue.get(block=not (self._rows or self._waiting))
                    if item is None:
                        self._fail_rows("server is shutting down")
                        for req in self._waiting:
                            req.report_failure("server is shutting down")
                        return
                    self._waiting.append(item)
            except queue.Empty:
                pass
            # The requests stay in _waiting until they are rows, so that pending() counts them throughout.
            take = self._next_prefill()
            self._relayout(self._prefill(self._waiting[:take]))
            del self._waiting[:take]
            if self._rows:
                try:
                    self._step()
                except Exception as exc:  # a failed step must not take the server down
                    log.exception("decode step failed")
                    self._fail_rows(f"generation failed: {exc}")

    def _fail_rows(self, msg: str) -> None:
        for seq in self._rows:
            if not seq.done:
                seq.req.report_failure(msg)
        self._rows, self._pads, self._kv = [], [], None

    def _next_prefill(self) -> int:
        """How many of the first waiting requests the next prefill takes: in arrival order, within the token budget,
        at least one. Requests that must not be prefilled are dropped from the waiting list here."""
        take = width = 0
        while take < len(self._waiting):
            req = self._waiting[take]
            if not self._admissible(req):
                del self._waiting[take]
                continue
            wider = max(width, len(req.prompt_ids))
            if take and wider * (take + 1) > self.max_prefill_tokens:
                break
            take, width = take + 1, wider
        return take

    def _admissible(self, req: GenerationRequest) -> bool:
        """False (after telling the caller why, unless it cancelled) when `req` must not be prefilled."""
        if _is_cancelled(req):
            return False
        problem = req.params.problem()
        if problem is None and not req.prompt_ids:
            problem = "input_ids is empty"
        if problem is None and self.max_positions and len(req.prompt_ids) + req.params.max_tokens > self.max_positions:
            problem = (f"input length {len(req.prompt_ids)} + request_output_len {req.params.max_tokens} exceeds "
                       f"the model's {self.max_positions} positions")
        if problem:
            req.report_failure(problem)
            return False
        return True

    def _prefill(self, reqs: list[GenerationRequest]) -> list[tuple[_Seq, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """One forward over the prompts of `reqs`, and each row's first token. The rows that go on, each with its
        keys and values per layer ([1, kv heads, prompt length, head dim] views).

        Right-padded: every prompt starts at position 0, so a plain causal forward (no mask) gives each row what
        it gets alone, padding only ever follows a row's own tokens, and each row's logits are read at its own
        last token. If the batch fails, each request is tried alone, so a bad one fails only itself."""
        if not reqs:
            return []
        lengths = [len(req.prompt_ids) for req in reqs]
        width = max(lengths)
        try:
            ids = torch.tensor([req.prompt_ids + [0] * (width - n) for req, n in zip(reqs, lengths)],
                               device=self.device)
            last = torch.tensor([[n - 1] for n in lengths], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=last)
        except Exception as exc:
            if len(reqs) > 1:
                log.exception("prefill of %d requests together failed; prefilling them one at a time", len(reqs))
                return [row for req in reqs for row in self._prefill([req])]
            log.exception("prefill failed")
            reqs[0].report_failure(str(exc))
            return []
        self._progress()
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        joining = []
        for i, (req, n) in enumerate(zip(reqs, lengths)):
            seq = _Seq(req, self.device)
            if self._advance(seq, out.logits[i, -1]):
                joining.append((seq, [(k[i: i + 1, :, :n], v[i: i + 1, :, :n]) for k, v in layers]))
        return joining

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
    def _relayout(self, joining: list[tuple[_Seq, list[tuple[torch.Tensor, torch.Tensor]]]]) -> None:
        """Drop finished and cancelled rows, add the joining ones and make room for the next step: one rebuild of
        the KV slab, only when the batch changes or the slab is full.

        Rows end at a common width (left padding); columns that are padding in every row are dropped."""
        keep = [i for i, seq in enumerate(self._rows) if not seq.done and not _is_cancelled(seq.req)]
        joining = [(seq, kv) for seq, kv in joining if not _is_cancelled(seq.req)]
        old = self._kv.layers if self._kv is not None else []
        width = old[0].width if old else 0
        if len(keep) == len(self._rows) and not joining and (not old or width < old[0].keys.shape[2]):
            return
        rows = [self._rows[i] for i in keep] + [seq for seq, _ in joining]
        if not rows:
            self._rows, self._pads, self._kv = [], [], None
            return
        trim = min((self._pads[i] for i in keep), default=width)
        live = width - trim
        new_width = max([live] + [seq.length for seq, _ in joining])
        # A row feeds back at most its remaining tokens but the last; no row needs more columns than that.
        room = max(seq.req.params.max_tokens - len(seq.tokens) for seq in rows)
        capacity = new_width + min(room, max(_SPARE_COLUMNS, new_width))
        idx = torch.tensor(keep, device=self.device)
        layers = []
        for li in range(len(old) if old else len(joining[0][1])):
            pair = []
            for t in (0, 1):  # keys, values
                before = (old[li].keys, old[li].values)[t] if old else None
                ref = before if before is not None else joining[0][1][li][t]
                # Zeros: padding columns are masked, but must stay finite (0 * NaN is NaN in the attention product).
                slab = ref.new_zeros(len(rows), ref.shape[1], capacity, ref.shape[3])
                if keep:
                    slab[: len(keep), :, new_width - live: new_width] = before[:, :, trim:width].index_select(0, idx)
                for j, (seq, kv) in enumerate(joining):
                    slab[len(keep) + j, :, new_width - seq.length: new_width] = kv[li][t][0]
                pair.append(slab)
            layers.append(_SlabLayer(pair[0], pair[1], new_width))
        self._pads = ([self._pads[i] - trim + new_width - live for i in keep]
                      + [new_width - seq.length for seq, _ in joining])
        self._kv = Cache(layers=layers)
        self._rows = rows

    def _step(self) -> None:
        width = self._kv.layers[0].width
        last = torch.tensor([[s.tokens[-1]] for s in self._rows], device=self.device)
        pads = torch.tensor(self._pads, device=self.device)
        mask = torch.arange(width + 1, device=self.device)[None, :] >= pads[:, None]
        positions = torch.tensor([[s.length] for s in self._rows], device=self.device)
        out = self.model(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=self._kv,
                         use_cache=True)
        self._progress()
        for i, seq in enumerate(self._rows):
            if not self._advance(seq, out.logits[i, -1]):
                seq.done = True


def _is_cancelled(req: GenerationRequest) -> bool:
    try:
        return req.cancelled is not None and bool(req.cancelled())
    except Exception:
        log.exception("cancelled() failed; dropping the request")
        return True

