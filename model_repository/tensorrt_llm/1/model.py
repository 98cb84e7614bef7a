"""Triton python model `tensorrt_llm` for CPU: the C++ tensorrtllm backend's tensor contract on PyTorch.

Decoupled: `execute` hands each request to `steerlm.generation.Engine`, whose thread batches all running
requests and sends responses as tokens arrive (streaming) or once at the end. Like the C++ backend, a
stream's responses carry only the new tokens and the prompt is not repeated unless the request asks for it.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from steerlm.generation import Engine, GenerationRequest, SamplingParams
from steerlm.serve.requests import parse_word_list

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _get(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return tensor.as_numpy()


def _scalar(request, name, default=None):
    arr = _get(request, name)
    return default if arr is None else arr.reshape(-1)[0].item()


def _words(request, name):
    arr = _get(request, name)
    return [] if arr is None else parse_word_list(arr.reshape(-1, 2, arr.shape[-1])[0])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.engine = Engine(params["hf_model_dir"], max_batch_size=int(params.get("max_batch_size", 8)))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(self._request(request, sender))
            except Exception as exc:  # a malformed request fails alone
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {exc}")), flags=FINAL)
        return None

    def _request(self, request, sender) -> GenerationRequest:
        input_ids = _get(request, "input_ids")
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids: expected one sequence per request (shape [1, n]), got {list(input_ids.shape)}")
        length = int(_scalar(request, "input_lengths", input_ids.shape[1]))
        prompt = input_ids[0, :length].astype(np.int64).tolist()
        beam = int(_scalar(request, "beam_width", 1))
        if beam != 1:
            raise ValueError(f"beam_width: only 1 is supported on the CPU backend, got {beam}")
        params = SamplingParams(
            max_tokens=int(_scalar(request, "request_output_len")),
            end_id=_scalar(request, "end_id"),
            temperature=float(_scalar(request, "temperature", 1.0)),
            top_k=int(_scalar(request, "runtime_top_k", 0)),
            top_p=float(_scalar(request, "runtime_top_p", 0.0)),
            seed=_scalar(request, "seed"),
            stop_words=_words(request, "stop_words_list"),
            bad_words=_words(request, "bad_words_list"),
        )
        if params.max_tokens < 1:
            raise ValueError(f"request_output_len must be >= 1, got {params.max_tokens}")
        stream = bool(_scalar(request, "streaming", False))
        # With exclude_input_in_output=false the prompt leads the output (the first response when streaming).
        echo = [] if bool(_scalar(request, "exclude_input_in_output", True)) else prompt

        def emit(tokens, final):
            nonlocal echo
            out, echo = echo + list(tokens), []
            response = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("output_ids", np.array(out, dtype=np.int32).reshape(1, 1, len(out))),
                pb_utils.Tensor("sequence_length", np.array([[len(out)]], dtype=np.int32)),
            ])
            sender.send(response, flags=FINAL if final else 0)

        def fail(message):
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)

        return GenerationRequest(prompt, params, emit, stream=stream, fail=fail, cancelled=sender.is_cancelled)

    def finalize(self):
        self.engine.close()
