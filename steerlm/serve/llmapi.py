"""The generation engine protocol (`steerlm.generation`) over TensorRT-LLM's LLM API.

`LLMAPIEngine` drives any object with the LLM API's surface: `generate_async(prompt_token_ids,
sampling_params=..., streaming=True)` returning a result that is async-iterable (each item has
`.outputs[0].token_ids`, the tokens so far, and `.finished`) and has `.abort()`; plus `.shutdown()`. On a
GPU that object is `tensorrt_llm.LLM` (PyTorch backend, TensorRT-LLM 1.0 .. 1.3+) or, for a TensorRT engine
built by TensorRT-LLM <= 1.2.x, `tensorrt_llm._tensorrt_engine.LLM`. The requests run as coroutines on one
asyncio loop in a background thread, as in upstream's Triton `llmapi` model
(NVIDIA/TensorRT-LLM triton_backend/all_models/llmapi/tensorrt_llm/1/model.py).

Semantics kept from the CPU engine: greedy unless top_k > 1 or top_p is set; the end id ends a sequence and
is not returned; stop words end it and are returned; streaming emits only new tokens, then an empty final
response; a cancelled request is aborted in the engine and gets no further responses.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from steerlm.sampling import GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

OPTIONS_FILE = "extra_llm_api_options.yaml"
ENGINE_INFO_FILE = "steerlm_engine.json"
FORMATS = ("llmapi", "legacy-engine")
# Keyword arguments of LLM(...) that a prebuilt TensorRT engine still takes; the others (cuda_graph_config,
# max_seq_len, ...) belong to the PyTorch backend or are fixed when the engine is built.
LEGACY_OPTION_KEYS = ("tensor_parallel_size", "max_batch_size", "max_num_tokens", "kv_cache_config")
INSTALL_HINT = ("TensorRT-LLM is not installed: pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm "
                "on a GPU machine, or run inside NVIDIA's Triton container "
                "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3 (26.03 and 26.07 ship TensorRT-LLM 1.2.1); "
                "without a GPU use --backend cpu")
CANCEL_POLL_S = 0.02
MIN_LLMAPI_VERSION = "1.0.0rc0"  # 1.0 made the PyTorch backend LLM(...)'s default


class LLMAPIError(RuntimeError):
    """TensorRT-LLM cannot serve this model here; the message says why and what to do (one line)."""


# -- sampling parameters ------------------------------------------------------------------------------------
class BannedSequences:
    """Logits processor that forbids the last token of each bad word once its other tokens were just generated
    (the LLM API takes bad words only as single token ids, `bad_token_ids`, or as strings that it tokenizes
    itself). Signature of tensorrt_llm.sampling_params.LogitsProcessor.__call__; `token_ids[0]` is the beam's
    sequence so far (on the PyTorch backend it starts with the prompt, so a word's first tokens may also end the
    prompt). Module-level and plain data so that it pickles to the executor workers."""

    def __init__(self, words: list[list[int]]) -> None:
        self.words = [list(w) for w in words]

    def banned(self, tokens: list[int]) -> list[int]:
        return [w[-1] for w in self.words if tokens[len(tokens) - (len(w) - 1):] == w[:-1]]

    def __call__(self, req_id: int, logits: Any, token_ids: list[list[int]], stream_ptr: int | None,
                 client_id: int | None) -> None:
        banned = self.banned(list(token_ids[0]))
        if not banned:
            return
        if stream_ptr is None:
            logits[..., banned] = float("-inf")
            return
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr)):
            logits[..., banned] = float("-inf")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BannedSequences) and other.words == self.words

    def __repr__(self) -> str:
        return f"BannedSequences({self.words})"


def llmapi_sampling_kwargs(params: SamplingParams, *, fresh_seed: int | None = None,
                           logits_processors: bool = True) -> dict[str, Any]:
    """Keyword arguments of TensorRT-LLM's `SamplingParams` (tensorrt_llm/sampling_params.py) for ours.

    `fresh_seed` is used for an unseeded sampled request: upstream's `seed=None` means the runtime default 0,
    which would make every unseeded request draw the same samples. Multi-token stop words are not part of
    the result: the LLM API accepts stop sequences only as strings, so `LLMAPIEngine` ends those itself.
    Bad words: with `logits_processors` (PyTorch backend, per-request processors since NVIDIA/TensorRT-LLM
    PR #3145) all of them go to one `BannedSequences`, which does not depend on the sampler implementing
    bad words (it did not in early PyTorch-backend releases, NVIDIA/TensorRT-LLM issue #3700); a TensorRT
    engine gets `bad_token_ids` and cannot take longer words (ValueError)."""
    kwargs: dict[str, Any] = {"max_tokens": params.max_tokens, "detokenize": False,
                              # Keep single-token stop words in the output (upstream trims them otherwise).
                              "include_stop_str_in_output": True}
    if params.end_id is None:
        kwargs["ignore_eos"] = True
    else:
        kwargs["end_id"] = params.end_id
    if not params.greedy:
        # Upstream is greedy when top_k is None/1 and top_p is None/0, so greedy requests send none of these.
        kwargs["temperature"] = params.temperature
        if params.top_k > 0:
            kwargs["top_k"] = params.top_k
        if params.top_p > 0:
            kwargs["top_p"] = params.top_p
        seed = params.seed if params.seed is not None else fresh_seed
        if seed is not None:
            kwargs["seed"] = seed
    stop_ids = [w[0] for w in params.stop_words if len(w) == 1]
    if stop_ids:
        kwargs["stop_token_ids"] = stop_ids
    bad = [list(w) for w in params.bad_words if w]
    if bad and logits_processors:
        kwargs["logits_processor"] = BannedSequences(bad)
    elif bad:
        if any(len(w) > 1 for w in bad):
            raise ValueError("bad_words: words of more than one token need the LLM API's PyTorch backend; a "
                             "TensorRT engine takes single-token bad words only")
        kwargs["bad_token_ids"] = [w[0] for w in bad]
    # Sent only when they change anything; upstream's None means the same neutral runtime defaults.
    for name, neutral in (("min_tokens", 0), ("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                          ("frequency_penalty", 0.0)):
        value = getattr(params, name)
        if value != neutral:
            kwargs[name] = value
    return kwargs


def multi_token_stop_words(params: SamplingParams) -> list[list[int]]:
    return [list(w) for w in params.stop_words if len(w) > 1]


def _stop_end(tokens: list[int], start: int, words: list[list[int]]) -> int | None:
    """Length of `tokens` up to the end of the first stop word that ends at or after index `start`."""
    for end in range(start + 1, len(tokens) + 1):
        if any(end >= len(w) and tokens[end - len(w):end] == w for w in words):
            return end
    return None


# -- the engine ---------------------------------------------------------------------------------------------
class LLMAPIEngine:
    """`submit`/`close` of steerlm.generation.Engine over an LLM-API object (see the module docstring).

    `sampling_params_cls` is the LLM API's SamplingParams class (tensorrt_llm.SamplingParams)."""

    def __init__(self, llm: Any, sampling_params_cls: Callable[..., Any], *,
                 logits_processors: bool = True) -> None:
        self.llm = llm
        self._sampling_params_cls = sampling_params_cls
        self._logits_processors = logits_processors
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        # Requests whose client may go away, polled together (as upstream's Triton model does) rather than by a
        # task each; and those found cancelled, whose consumer then ends without a response.
        self._watched: dict[asyncio.Task, tuple[GenerationRequest, Any]] = {}
        self._aborted: set[asyncio.Task] = set()
        self._pending = 0  # submitted and not yet ended; read by the generator's watchdog and metrics
        self._lock = threading.Lock()
        self.tokens = 0  # tokens delivered
        self.last_progress = time.monotonic()  # when the engine last produced output
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="steerlm-llmapi", daemon=True)
        self._thread.start()
        self._poller = asyncio.run_coroutine_threadsafe(self._poll_cancelled(), self._loop)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, options: dict[str, Any] | None = None) -> LLMAPIEngine:
        llm, sampling_params_cls, legacy = load_llm(model_dir, options)
        return cls(llm, sampling_params_cls, logits_processors=not legacy)

    def submit(self, request: GenerationRequest) -> None:
        if self._closed:
            raise RuntimeError("engine is closed")
        with self._lock:
            self._pending += 1
        self._loop.call_soon_threadsafe(self._start, request)

    def pending(self) -> int:
        """Requests submitted that have not ended yet."""
        return self._pending

    @property
    def running(self) -> int:
        return self._pending

    def _start(self, request: GenerationRequest) -> None:
        task = self._loop.create_task(self._run(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        self._poller.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        try:
            # While the loop still runs: the executor's last callbacks for aborted requests land on it.
            self.llm.shutdown()
        except Exception:
            log.exception("TensorRT-LLM shutdown failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _sampling_params(self, params: SamplingParams) -> Any:
        kwargs = llmapi_sampling_kwargs(params, fresh_seed=secrets.randbits(63),
                                        logits_processors=self._logits_processors)
        return self._sampling_params_cls(**kwargs)

    async def _run(self, req: GenerationRequest) -> None:
        try:
            await self._generate(req)
        finally:
            with self._lock:
                self._pending -= 1

    async def _generate(self, req: GenerationRequest) -> None:
        try:
            if not req.prompt_ids:
                raise ValueError("input_ids is empty")
            problem = req.params.problem()  # checked before the request reaches the engine's batch
            if problem:
                raise ValueError(problem)
            result = self.llm.generate_async(list(req.prompt_ids), sampling_params=self._sampling_params(req.params),
                                             streaming=True)
        except Exception as exc:
            log.warning("request refused: %s", exc)
            req.report_failure(str(exc))
            return
        task = asyncio.current_task()
        if req.cancelled is not None:
            self._watched[task] = (req, result)
        try:
            await self._consume(req, result)
        except asyncio.CancelledError:
            if task not in self._aborted:  # close(), not the client: end the request with an error
                _abort(result)
                req.report_failure("server is shutting down")
        except Exception as exc:
            log.warning("generation failed: %s", exc)
            req.report_failure(f"generation failed: {exc}")
        finally:
            self._watched.pop(task, None)
            self._aborted.discard(task)

    async def _consume(self, req: GenerationRequest, result: Any) -> None:
        stops = multi_token_stop_words(req.params)
        tokens: list[int] = []
        async for output in result:
            self.last_progress = time.monotonic()
            ids = list(output.outputs[0].token_ids)
            finished = bool(output.finished)
            if finished and req.params.end_id is not None and ids and ids[-1] == req.params.end_id:
                ids.pop()  # the end id is not returned (whichever way the backend reports it)
            new = ids[len(tokens):]
            end = _stop_end(ids, len(tokens), stops) if stops else None
            if end is not None:
                new, finished = ids[len(tokens):end], True
                _abort(result)  # the LLM API ends on stop strings only: end the sequence here
            tokens.extend(new)
            self.tokens += len(new)
            req.deliver(tokens, new, finished)
            if finished:
                return
        raise RuntimeError("TensorRT-LLM ended the request without a final response")

    async def _poll_cancelled(self) -> None:
        """Abort in the engine every request whose client is gone; its consumer stops without a response."""
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            for task, (req, result) in list(self._watched.items()):
                try:
                    gone = req.cancelled()
                except Exception:
                    log.exception("cancelled() failed")
                    continue
                if gone:
                    del self._watched[task]
                    self._aborted.add(task)
                    _abort(result)
                    task.cancel()


def _abort(result: Any) -> None:
    try:
        result.abort()
    except Exception:
        log.exception("abort failed")


# -- loading ------------------------------------------------------------------------------------------------
@dataclass
class ModelLayout:
    """Where the LLM API loads from, as `make engine` (CONTRACTS.md 2) or a plain checkpoint lays it out."""

    format: str  # "llmapi" | "legacy-engine"
    model: Path  # what LLM(model=...) loads: the HF checkpoint, or the TensorRT engine directory
    tokenizer: Path  # tokenizer.json and steerlm.json (the template the generator and preprocessing use)
    options: dict[str, Any]
    required_version: str | None  # a version specifier (PEP 440), e.g. "==1.2.1" or ">=1.0"


def read_layout(model_dir: str | os.PathLike, options: dict[str, Any] | None = None) -> ModelLayout:
    """Read `steerlm_engine.json` and `extra_llm_api_options.yaml` (both optional: a SteerLM checkpoint alone
    loads with default options); `options` override the file's keys."""
    import yaml

    root = Path(model_dir)
    info: dict[str, Any] = {}
    info_path = root / ENGINE_INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
    fmt = info.get("format", "llmapi")
    if fmt not in FORMATS:
        raise LLMAPIError(f"{info_path}: format {fmt!r} is not one of: {', '.join(FORMATS)}")
    merged: dict[str, Any] = {}
    options_path = root / OPTIONS_FILE
    if options_path.is_file():
        loaded = yaml.safe_load(options_path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise LLMAPIError(f"{options_path}: expected a mapping of LLM(...) keyword arguments")
        merged.update(loaded)
    merged.update(options or {})
    if "tp_size" in info and "tensor_parallel_size" not in merged:
        merged["tensor_parallel_size"] = int(info["tp_size"])
    model = tokenizer = root
    if fmt == "legacy-engine":
        model = root / "engine"
        if not (model / "config.json").is_file():
            raise LLMAPIError(f"{model} holds no TensorRT engine (config.json); build it with `make engine "
                              f"ENGINE=legacy` where trtllm-build exists (TensorRT-LLM <= 1.2.x)")
        # `make engine ENGINE=legacy` puts the tokenizer and steerlm.json next to the engine.
        if not (root / "tokenizer.json").is_file():
            tokenizer = model
    elif not (root / "config.json").is_file():
        raise LLMAPIError(f"{root} has no config.json: give a SteerLM checkpoint or a `make engine` output")
    return ModelLayout(fmt, model, tokenizer, merged, info.get("tensorrt_llm"))


def installed_version() -> str | None:
    """Installed TensorRT-LLM version, read from package metadata (importing it would initialise CUDA)."""
    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version(layout: ModelLayout, installed: str | None) -> None:
    """Raise LLMAPIError (one line) when the installed TensorRT-LLM cannot load `layout`."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import Version

    if installed is None:
        raise LLMAPIError(INSTALL_HINT)
    have = Version(installed)
    if layout.format == "legacy-engine":
        if have >= Version("1.3.0rc0"):
            raise LLMAPIError(
                f"{layout.model} is a TensorRT engine, and TensorRT-LLM {installed} has no TensorRT backend "
                f"(removed in 1.3): serve it in a TensorRT-LLM 1.2.x container (Triton 26.03/26.07), or rebuild "
                f"with `make engine` (default format: the checkpoint the LLM API loads directly)")
        built = json.loads((layout.model / "config.json").read_text()).get("version")
        if built and Version(built) != have:
            raise LLMAPIError(f"the TensorRT engine in {layout.model} was built by TensorRT-LLM {built}, which must "
                              f"also run it; installed: {installed}")
    elif have < Version(MIN_LLMAPI_VERSION):
        raise LLMAPIError(f"serving a checkpoint through the LLM API needs TensorRT-LLM >= {MIN_LLMAPI_VERSION} "
                          f"(PyTorch backend by default); installed: {installed}")
    if layout.required_version:
        try:
            spec = SpecifierSet(layout.required_version, prereleases=True)
        except InvalidSpecifier:
            spec = SpecifierSet(f"=={layout.required_version}", prereleases=True)
        if have not in spec:
            raise LLMAPIError(f"{layout.model} needs TensorRT-LLM {spec} ({ENGINE_INFO_FILE}); installed: "
                              f"{installed}")


def llm_kwargs(layout: ModelLayout) -> dict[str, Any]:
    """Keyword arguments for LLM(...): the options file's, filtered for a TensorRT engine."""
    kwargs = dict(layout.options)
    if layout.format == "legacy-engine":
        dropped = sorted(set(kwargs) - set(LEGACY_OPTION_KEYS))
        if dropped:
            log.info("a TensorRT engine fixes these at build time; ignoring %s", ", ".join(dropped))
        kwargs = {k: v for k, v in kwargs.items() if k in LEGACY_OPTION_KEYS}
    return kwargs


def engine_options(model_dir: str | os.PathLike, max_batch_size: int, options: dict[str, Any]) -> dict[str, Any]:
    """Options given to the engine beyond its options file: the generator's `max_batch_size` applies only where
    neither the file (the memory plan `make engine` made) nor `options` set one."""
    merged = dict(options)
    if "max_batch_size" not in read_layout(model_dir).options and "max_batch_size" not in merged:
        merged["max_batch_size"] = max_batch_size
    return merged


def llmapi_engine(model_dir: str | os.PathLike, *, max_batch_size: int, **options: Any) -> LLMAPIEngine:
    """The `trtllm` entry of steerlm.serve.engines.ENGINES: `model_dir` is a SteerLM checkpoint or what
    `make engine` wrote; `options` (LLM(...) keyword arguments, e.g. tensor_parallel_size) override its
    options file."""
    return LLMAPIEngine.from_model_dir(model_dir, engine_options(model_dir, max_batch_size, options))


def preflight(model_dir: str | os.PathLike, options: dict[str, Any] | None = None) -> ModelLayout:
    """Everything that can be checked before a server starts: layout, TensorRT-LLM version, TP size."""
    from steerlm.serve.launch import engine_world_size

    layout = read_layout(model_dir, options)
    check_version(layout, installed_version())
    tp = int(layout.options.get("tensor_parallel_size", 1))
    if layout.format == "legacy-engine":
        built = engine_world_size(layout.model)
        if built is not None and built != tp:
            raise LLMAPIError(f"the TensorRT engine in {layout.model} was built for {built} ranks but "
                              f"tensor_parallel_size is {tp}")
    return layout


def load_llm(model_dir: str | os.PathLike, options: dict[str, Any] | None = None) -> tuple[Any, Any, bool]:
    """(LLM, SamplingParams class, is_legacy) for a SteerLM checkpoint or a `make engine` output."""
    layout = preflight(model_dir, options)
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise LLMAPIError(f"{INSTALL_HINT} (import failed: {exc})") from None
    if layout.format == "legacy-engine":
        from tensorrt_llm._tensorrt_engine import LLM
    else:
        LLM = tensorrt_llm.LLM
    kwargs = llm_kwargs(layout)
    # The conversion trtllm-serve applies to --extra_llm_api_options (nested dicts -> config objects); upstream's
    # Triton llmapi model imports it from llm_utils, some releases define it in llm_args only.
    for module in ("tensorrt_llm.llmapi.llm_utils", "tensorrt_llm.llmapi.llm_args"):
        try:
            update = getattr(importlib.import_module(module), "update_llm_args_with_extra_dict", None)
        except ImportError:
            update = None
        if update is not None:
            kwargs = update({}, kwargs)
            break
    else:
        log.info("this TensorRT-LLM has no update_llm_args_with_extra_dict; passing the options as they are")
    llm = LLM(model=str(layout.model), tokenizer=str(layout.tokenizer), **kwargs)
    return llm, tensorrt_llm.SamplingParams, layout.format == "legacy-engine"
