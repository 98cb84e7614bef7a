"""Triton python model `postprocessing`: runs the request on `tensorrt_llm` and turns tokens into text.

Decoupled: every request gets a thread that sends the prepared tensors to the generator (BLS, the same
tensors an ensemble step would pass) and forwards the text of each generated piece as it arrives. The text
logic (incremental detokenization, stop strings) is `steerlm.serve.textstream.TextStream`.
"""

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from steerlm.serve.textstream import TextStream
from steerlm.spec import load_spec
from steerlm.tokenize import load_tokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
GENERATOR_INPUTS = ("input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list",
                    "bad_words_list", "streaming", "temperature", "runtime_top_k", "runtime_top_p", "seed")


def _text_tensor(name, text):
    data = text.encode("utf-8") if isinstance(text, str) else text
    return pb_utils.Tensor(name, np.array([[data]], dtype=np.object_))


def _response(text, prompt):
    return pb_utils.InferenceResponse(output_tensors=[_text_tensor("OUTPUT", text), _text_tensor("OUT_PROMPT", prompt)])


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        model_dir = params["model_dir"]["string_value"]
        self.generator = params["generator_model"]["string_value"]
        self.tokenizer = load_tokenizer(model_dir)
        self.trailer = load_spec(model_dir).template.answer_end

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._run, args=(request,), daemon=True).start()
        return None

    def _run(self, request):
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
        except Exception as exc:  # a failure ends this request only
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {exc}")),
                        flags=FINAL)

    def _generate(self, request, sender):
        stream = bool(_scalar(request, "streaming", False))
        inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in GENERATOR_INPUTS) if t is not None]
        stops = [s.decode("utf-8") for s in pb_utils.get_input_tensor_by_name(request, "STOP_STRINGS").as_numpy().reshape(-1)]
        prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)[0]
        text = TextStream(self.tokenizer, stops, end_id=_scalar(request, "end_id"),
                          max_tokens=_scalar(request, "request_output_len"), trailer=self.trailer)
        generation = pb_utils.InferenceRequest(
            model_name=self.generator, inputs=inputs, requested_output_names=["output_ids", "sequence_length"])
        pieces, first = [], True
        for response in generation.exec(decoupled=True):
            if response.has_error():
                raise RuntimeError(response.error().message())
            if sender.is_cancelled():  # the client went away (the generator finishes within max_tokens)
                sender.send(flags=FINAL)
                return
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if ids is None:  # the generator's closing response carries no tensors
                continue
            n = int(pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy().reshape(-1)[0])
            piece = text.feed(ids.as_numpy().reshape(-1)[:n].tolist())
            if not stream:
                pieces.append(piece)
            elif piece or first:
                sender.send(_response(piece, prompt if first else b""))
                first = False
        tail = text.finish()
        if not stream:
            sender.send(_response("".join(pieces) + tail, prompt), flags=FINAL)
        elif tail or first:
            sender.send(_response(tail, prompt if first else b""), flags=FINAL)
        else:
            sender.send(flags=FINAL)
