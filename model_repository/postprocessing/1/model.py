"""Triton python model `postprocessing`: token ids -> answer text, incrementally for streams.

A streamed request reaches this model once per generation response, each time with the same
DETOKENIZE_STATE (from preprocessing), whose key finds the request's `TextStream`.
"""

import json
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

from steerlm.serve.textstream import TextStream
from steerlm.tokenize import load_tokenizer

# Streams whose client went away never finish; forget the oldest beyond this many.
MAX_OPEN_STREAMS = 4096


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.tokenizer = load_tokenizer(params["model_dir"]["string_value"])
        self.open: OrderedDict[str, TextStream] = OrderedDict()
        # Finished streams can still get a response (the generator's empty final one): answer it with "".
        self.finished: OrderedDict[str, None] = OrderedDict()

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        state = json.loads(pb_utils.get_input_tensor_by_name(request, "DETOKENIZE_STATE").as_numpy().reshape(-1)[0])
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # [1, beam, n]
        lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # [1, beam]
        n = int(lengths.reshape(-1)[0]) if lengths.size else 0
        ids = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])[0, 0, :n].tolist() if tokens.size else []
        prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)[0]
        key = state["key"]
        if not state["stream"]:
            text = self._new_stream(state).feed(ids, last=True)
        elif key in self.finished:
            text, prompt = "", b""
        else:
            stream = self.open.pop(key, None)
            if stream is None:
                stream = self._new_stream(state)
            else:
                prompt = b""  # sent with the first response of the stream only
            text = stream.feed(ids)
            if stream.done:
                self._remember(self.finished, key, None)
            else:
                self._remember(self.open, key, stream)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("OUTPUT", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("OUT_PROMPT", np.array([[prompt]], dtype=np.object_)),
        ])

    def _new_stream(self, state) -> TextStream:
        return TextStream(self.tokenizer, state["stop"], end_id=state["end_id"], max_tokens=state["max_tokens"],
                          trailer=state["trailer"])

    @staticmethod
    def _remember(table: OrderedDict, key, value) -> None:
        table[key] = value
        while len(table) > MAX_OPEN_STREAMS:
            table.popitem(last=False)
