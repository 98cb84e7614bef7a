"""Triton python model `preprocessing`: validation, prompt rendering and tokenization of a SteerLM request.

The logic lives in `steerlm.serve.requests` (tested without a server); this file maps tensors to it. Its
inputs carry the ensemble's names, so every error names the field the client sent. Its one output is the
signed request document the `generator` model runs.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from steerlm.serve.requests import (
    DEFAULT_MAX_INPUT_BYTES,
    SAMPLING_TYPES,
    RequestBuilder,
    RequestError,
    decode_text,
    load_key,
)

TEXT = ("attributes", "system", "history")
FLAGS = ("stream", "exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens")


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.builder = RequestBuilder(params["model_dir"])
        self.limit = int(params.get("max_input_bytes", DEFAULT_MAX_INPUT_BYTES))
        self.key = load_key(Path(args["model_repository"]).parent)

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            document, signature = self._prepare(request).to_wire(self.key)
        except RequestError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {exc}"))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("REQUEST", np.array([[document]], dtype=np.object_)),
            pb_utils.Tensor("SIGNATURE", np.array([[signature]], dtype=np.object_)),
        ])

    def _prepare(self, request):
        # One pass over the request's inputs (pb_utils.get_input_tensor_by_name rebuilds the list on every call).
        inputs = {tensor.name(): tensor for tensor in request.inputs()}
        words = {name: [decode_text(f"{name}[{i}]", v, self.limit) for i, v in enumerate(self._values(inputs, name))]
                 for name in ("stop_words", "bad_words")}
        text = {name: self._text(inputs, name) for name in TEXT}
        sampling = {name: self._scalar(inputs, name) for name in SAMPLING_TYPES}
        min_length = self._scalar(inputs, "min_length")
        if min_length is not None:
            if sampling["min_tokens"] not in (None, min_length):
                raise RequestError(f"min_length is another name for min_tokens; got both, and they differ "
                                   f"({min_length} and {sampling['min_tokens']})")
            sampling["min_tokens"] = min_length
        return self.builder.build(
            self._text(inputs, "text_input"), self._scalar(inputs, "max_tokens"),
            **text, **words,
            end_id=self._scalar(inputs, "end_id"), pad_id=self._scalar(inputs, "pad_id"),
            sampling=sampling,
            beam_width=self._scalar(inputs, "beam_width"),
            num_return_sequences=self._scalar(inputs, "num_return_sequences"),
            **{name: self._scalar(inputs, name) for name in FLAGS},
        )

    @staticmethod
    def _values(inputs, name):
        tensor = inputs.get(name)
        return [] if tensor is None else tensor.as_numpy().reshape(-1).tolist()

    def _scalar(self, inputs, name):
        """One value of a [1, 1] (batch, 1) input, or None when the client left it out."""
        values = self._values(inputs, name)
        if len(values) > 1:
            raise RequestError(f"{name} must hold exactly one value (one conversation per request), "
                               f"got {len(values)}")
        return values[0] if values else None

    def _text(self, inputs, name):
        value = self._scalar(inputs, name)
        return None if value is None else decode_text(name, value, self.limit)
