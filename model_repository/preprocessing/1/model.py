"""Triton python model `preprocessing`: validation, prompt rendering and tokenization of a SteerLM request.

The logic lives in `steerlm.serve.requests` (`RequestBuilder.from_inputs`, tested without a server; the
`steerlm` relay builds its requests with the same call); this file maps tensors to it. Its inputs carry the
ensemble's names, so every error names the field the client sent. Its one output is the signed request
document that `generator_whole` forwards to the generator.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from steerlm.serve.requests import DEFAULT_MAX_INPUT_BYTES, RequestBuilder, RequestError, load_key


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
            # One pass over the inputs (pb_utils.get_input_tensor_by_name rebuilds the list on every call).
            inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
            document, signature = self.builder.from_inputs(inputs, self.limit).to_wire(self.key)
        except RequestError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {exc}"))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("REQUEST", np.array([[document]], dtype=np.object_)),
            pb_utils.Tensor("SIGNATURE", np.array([[signature]], dtype=np.object_)),
        ])
