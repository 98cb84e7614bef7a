"""Triton python model `steerlm` (also `ensemble`; decoupled): relays each request to the generator's engine.

The logic is `steerlm.serve.relay` (tested without a server); this file maps Triton's requests and response
senders to it.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from steerlm.serve.ipc import IpcClient
from steerlm.serve.relay import Relay
from steerlm.serve.requests import DEFAULT_MAX_INPUT_BYTES, RequestBuilder, load_key

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Sender:
    def __init__(self, sender):
        self.sender = sender

    def send(self, outputs, final, error=None):
        flags = FINAL if final else 0
        if error is not None:
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)), flags=flags)
        elif outputs is None:
            self.sender.send(flags=flags)
        else:
            self.sender.send(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()]), flags=flags)

    def is_cancelled(self):
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        socket = params["ipc_socket"]
        self.relay = Relay(RequestBuilder(params["model_dir"]), load_key(Path(args["model_repository"]).parent),
                           int(params.get("max_input_bytes", DEFAULT_MAX_INPUT_BYTES)), lambda: IpcClient(socket))

    def execute(self, requests):
        for request in requests:
            # One pass over the inputs (pb_utils.get_input_tensor_by_name rebuilds the list on every call).
            inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
            self.relay.start(inputs, Sender(request.get_response_sender()), request.request_id())
        return None

    def finalize(self):
        self.relay.join(timeout=5)
