"""SteerClient: whole and streamed answers over gRPC (ModelStreamInfer) or HTTP (generate extension)."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from steerlm.schema import format_labels

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


class SteerError(RuntimeError):
    """The server rejected the request or could not be reached; the message is the server's."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt: str  # the exact prompt the server rendered


def labels(attributes: Mapping[str, int] | str | None) -> str | None:
    """`{"verbosity": 4}` or `"verbosity:4"` (also `verbosity=4`) -> the server's label form."""
    if attributes is None or isinstance(attributes, str):
        return attributes or None
    return format_labels(attributes) or None


def history_json(history: Sequence[Mapping[str, Any]] | str | None) -> str | None:
    """Earlier turns as the `history` input: a JSON list of {question, answer[, attributes]} objects."""
    if history is None or isinstance(history, str):
        return history or None
    turns = []
    for turn in history:
        item = {"question": turn["question"], "answer": turn["answer"]}
        if turn.get("attributes") is not None:
            item["attributes"] = labels(turn["attributes"])
        if turn.get("labels") is not None:
            item["labels"] = turn["labels"]
        turns.append(item)
    return json.dumps(turns) if turns else None


class StreamedAnswer:
    """Iterator over the text pieces of a streamed answer; `.prompt` is set once the first piece arrived."""

    def __init__(self, pieces: Iterator[tuple[str, str]]) -> None:
        self._pieces = pieces
        self.prompt: str | None = None

    def __iter__(self) -> Iterator[str]:
        for text, prompt in self._pieces:
            if prompt and self.prompt is None:
                self.prompt = prompt
            if text:
                yield text


class SteerClient:
    """Client for the `steerlm` ensemble. `url` is host:port of the gRPC or HTTP endpoint.

    Every call opens its own connection, so one client may be used from several threads."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", *, model: str = "steerlm",
                 reward_model: str = "reward_model", timeout: float = 600.0) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.protocol = protocol
        self.url = (url or DEFAULT_URLS[protocol]).removeprefix("http://")
        self.model = model
        self.reward_model = reward_model
        self.timeout = timeout

    # -- generation -------------------------------------------------------------------------------------
    def generate(self, question: str, **kwargs) -> str:
        """The whole answer. Keyword arguments as for `complete`."""
        return self.complete(question, **kwargs).text

    def complete(
        self,
        question: str,
        *,
        attributes: Mapping[str, int] | str | None = None,
        system: str | None = None,
        history: Sequence[Mapping[str, Any]] | str | None = None,
        max_tokens: int = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_words: Sequence[str] | None = None,
        bad_words: Sequence[str] | None = None,
        min_tokens: int | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
    ) -> Completion:
        """The whole answer and the prompt the server rendered for it.

        attributes: {"verbosity": 4} or "verbosity:4,creativity:1" (others take the model's defaults);
        history: earlier turns [{"question": ..., "answer": ..., "attributes": ... (optional)}].
        Sampling follows TensorRT-LLM: greedy unless top_k > 1 or top_p > 0. min_tokens and the penalties are
        upstream's ensemble inputs (min_tokens keeps the end id away until that many tokens, e.g. for benchmarks)."""
        fields = self._fields(question, attributes, system, history, max_tokens, temperature, top_k, top_p, seed,
                              stop_words, bad_words, min_tokens, repetition_penalty, presence_penalty,
                              frequency_penalty, stream=False)
        text, prompt = [], ""
        for piece, p in self._send(fields):
            text.append(piece)
            prompt = prompt or p
        return Completion("".join(text), prompt)

    def stream(self, question: str, **kwargs) -> StreamedAnswer:
        """The answer piece by piece as it is generated (same keyword arguments as `complete`)."""
        args = dict(attributes=None, system=None, history=None, max_tokens=256, temperature=None, top_k=None,
                    top_p=None, seed=None, stop_words=None, bad_words=None, min_tokens=None,
                    repetition_penalty=None, presence_penalty=None, frequency_penalty=None)
        unknown = set(kwargs) - set(args)
        if unknown:
            raise TypeError(f"unknown arguments: {', '.join(sorted(unknown))}")
        args.update(kwargs)
        fields = self._fields(question, **args, stream=True)
        return StreamedAnswer(self._send(fields))

    @staticmethod
    def _fields(question, attributes, system, history, max_tokens, temperature, top_k, top_p, seed, stop_words,
                bad_words, min_tokens, repetition_penalty, presence_penalty, frequency_penalty,
                stream) -> dict[str, Any]:
        fields = {
            "text_input": question, "max_tokens": int(max_tokens), "attributes": labels(attributes),
            "system": system, "history": history_json(history), "stream": stream,
            "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
            "stop_words": list(stop_words) if stop_words else None,
            "bad_words": list(bad_words) if bad_words else None,
            "min_tokens": min_tokens, "repetition_penalty": repetition_penalty,
            "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
        }
        return {k: v for k, v in fields.items() if v is not None}

    def _send(self, fields: dict[str, Any]) -> Iterator[tuple[str, str]]:
        return self._send_grpc(fields) if self.protocol == "grpc" else self._send_http(fields)

    # gRPC: the ensemble is decoupled (it streams), which Triton serves through ModelStreamInfer only.
    def _send_grpc(self, fields: dict[str, Any]) -> Iterator[tuple[str, str]]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = [_grpc_input(grpcclient, name, value) for name, value in fields.items()]
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        finished = False
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)),
                                stream_timeout=self.timeout)
            client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            while True:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise SteerError(f"no response from {self.url} within {self.timeout:.0f} s") from None
                if error is not None:
                    finished = True  # an error response ends the request
                    raise SteerError(_message(error))
                text = result.as_numpy("text_output")
                prompt = result.as_numpy("prompt")
                if text is not None:
                    yield _str(text), _str(prompt) if prompt is not None else ""
                if result.get_response().parameters["triton_final_response"].bool_param:
                    finished = True
                    return
        except InferenceServerException as exc:
            # A broken stream reports its cause through the callback; that is the useful message.
            try:
                _, error = results.get_nowait()
            except queue.Empty:
                error = None
            raise SteerError(_message(error or exc)) from None
        finally:
            try:
                # Cancel only a request still running (the caller stopped reading early): cancelling one that
                # has already finished leaves tritonserver unable to unload the ensemble, so SIGTERM hangs.
                client.stop_stream(cancel_requests=not finished)
            finally:
                client.close()

    # HTTP: Triton's generate extension (JSON in; one JSON answer, or server-sent events when streaming).
    def _send_http(self, fields: dict[str, Any]) -> Iterator[tuple[str, str]]:
        endpoint = "generate_stream" if fields.get("stream") else "generate"
        request = urllib.request.Request(
            f"http://{self.url}/v2/models/{self.model}/{endpoint}",
            data=json.dumps(fields).encode("utf-8"), headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                if endpoint == "generate":
                    doc = json.loads(response.read())
                    yield doc.get("text_output", ""), doc.get("prompt", "")
                    return
                for line in response:
                    line = line.decode("utf-8").rstrip("\r\n")
                    if not line.startswith("data:"):
                        continue
                    doc = json.loads(line[5:])
                    if "error" in doc:
                        raise SteerError(doc["error"])
                    yield doc.get("text_output", ""), doc.get("prompt", "")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")
            try:
                body = json.loads(body).get("error", body)
            except ValueError:
                pass
            raise SteerError(body) from None
        except urllib.error.URLError as exc:
            raise SteerError(f"cannot reach {self.url}: {exc.reason}") from None

    # -- reward model ----------------------------------------------------------------------------------
    def score(self, turns: Iterable[Mapping[str, str] | Sequence[str] | Any], system: str | None = None) -> dict:
        """Attribute scores of a conversation from `reward_model`.

        turns: [{"question": ..., "answer": ...}, ...] (or (question, answer) pairs, or objects with
        .question/.answer). Returns {"scores": {attribute: raw score}, "labels": "name:value,..."} and, when
        the reward model has attribute weights, "reward": their weighted sum."""
        doc = {"system": system, "turns": [_turn(t) for t in turns]}
        # reward_model batches (NeMo-Aligner's PyTriton contract): one row of a [batch, 1] input.
        arr = np.array([[json.dumps(doc).encode("utf-8")]], dtype=np.object_)
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        from tritonclient.utils import InferenceServerException

        inp = tc.InferInput("conversation", [1, 1], "BYTES")
        inp.set_data_from_numpy(arr)
        client = tc.InferenceServerClient(self.url)
        try:
            result = client.infer(self.reward_model, [inp])
        except InferenceServerException as exc:
            raise SteerError(_message(exc)) from None
        finally:
            client.close()
        names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in result.as_numpy("attributes").reshape(-1)]
        scores = result.as_numpy("scores").astype(float).reshape(-1).tolist()
        out = {"scores": dict(zip(names, scores)), "labels": _str(result.as_numpy("labels"))}
        reward = result.as_numpy("reward")
        if reward is not None:
            out["reward"] = float(np.asarray(reward).reshape(-1)[0])
        return out


def _turn(turn) -> dict[str, str]:
    if isinstance(turn, Mapping):
        return {"question": turn["question"], "answer": turn["answer"]}
    if isinstance(turn, (tuple, list)):
        question, answer = turn
        return {"question": question, "answer": answer}
    return {"question": turn.question, "answer": turn.answer}


_DTYPES = {"text_input": "BYTES", "attributes": "BYTES", "system": "BYTES", "history": "BYTES",
           "stop_words": "BYTES", "bad_words": "BYTES", "max_tokens": "INT32", "top_k": "INT32",
           "temperature": "FP32", "top_p": "FP32", "seed": "UINT64", "stream": "BOOL", "min_tokens": "INT32",
           "repetition_penalty": "FP32", "presence_penalty": "FP32", "frequency_penalty": "FP32"}
_NUMPY = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": bool}


def _grpc_input(grpcclient, name: str, value):
    dtype = _DTYPES[name]
    values = value if isinstance(value, list) else [value]
    if dtype == "BYTES":
        values = [v.encode("utf-8") for v in values]
    arr = np.array([values], dtype=_NUMPY[dtype])  # [batch 1, n]
    tensor = grpcclient.InferInput(name, list(arr.shape), dtype)
    tensor.set_data_from_numpy(arr)
    return tensor


def _str(arr) -> str:
    value = np.asarray(arr).reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _message(exc) -> str:
    msg = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return msg or str(exc)
