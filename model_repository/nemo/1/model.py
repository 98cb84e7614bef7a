"""Triton python model for NeMo's NemoQueryLLM (rendered under the name given by --triton-model-name).

The logic is `steerlm.serve.nemo` and `steerlm.serve.whole` (tested without a server); this file maps tensors
to them. A request holds one row per prompt; its answer has one `outputs` row per prompt, and a request any
of whose prompts is refused fails as a whole with the reason, naming the row.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from steerlm.serve.nemo import NEMO_INPUTS, NemoPrompts
from steerlm.serve.requests import RequestError, decode_text, load_key
from steerlm.serve.whole import WholeForwarder

SCALARS = [name for name, (_, dims) in NEMO_INPUTS.items() if dims == "1" and name != "prompts"]


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.prompts = NemoPrompts(params["model_dir"])
        self.limit = int(params["max_input_bytes"])
        self.key = load_key(Path(args["model_repository"]).parent)
        self.forwarder = WholeForwarder(params["ipc_socket"])

    def execute(self, requests):
        # Every row of every request generates at once; then each request collects its rows.
        rows = []
        for request in requests:
            try:
                rows.append([self._prepare(request, i) for i in range(self._rows(request))])
            except RequestError as exc:
                rows.append(f"bad request: {exc}")
        jobs = [job for r in rows if not isinstance(r, str) for job in r]
        results = iter(self.forwarder.run_all(jobs))
        responses = []
        for r in rows:
            outcomes = [next(results) for _ in ([] if isinstance(r, str) else r)]
            error = r if isinstance(r, str) else next((o for o in outcomes if isinstance(o, str)), None)
            if error is not None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
                continue
            texts = np.array([[o["text_output"].encode("utf-8")] for o in outcomes], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("outputs", texts)]))
        return responses

    @staticmethod
    def _array(request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _rows(self, request):
        return self._array(request, "prompts").shape[0]

    def _prepare(self, request, row):
        def at(name):
            array = self._array(request, name)
            return None if array is None else array[min(row, array.shape[0] - 1)].reshape(-1)

        prompt = decode_text(f"prompts[{row}]", at("prompts")[0], self.limit)
        values = {}
        for name in SCALARS:
            value = at(name)
            values[name] = None if value is None else value[0].item()
        words = {name: [decode_text(f"{name}[{i}]", w, self.limit) for i, w in enumerate(at(name))]
                 if at(name) is not None else [] for name in ("stop_words_list", "bad_words_list")}
        try:
            prepared = self.prompts.prepare(prompt, values, words["stop_words_list"], words["bad_words_list"])
        except RequestError as exc:
            raise RequestError(f"prompts[{row}]: {exc}") from None
        return prepared.to_wire(self.key)
