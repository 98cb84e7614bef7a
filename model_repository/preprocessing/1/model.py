"""Triton python model `preprocessing`: request validation, prompt rendering and tokenization.

The logic lives in `steerlm.serve.requests` (tested without a server); this file maps tensors to it.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from steerlm.serve.requests import RequestBuilder, RequestError, word_list

# This model's input names -> the ensemble's, for error messages.
USER_NAMES = {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "ATTRIBUTES": "attributes",
              "SYSTEM": "system", "HISTORY": "history", "END_ID": "end_id", "PAD_ID": "pad_id"}


def _optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _scalar(request, name):
    """One value of a [1, 1] (batch, 1) input, or None when the client left it out."""
    arr = _optional(request, name)
    if arr is None:
        return None
    if arr.size != 1:
        raise RequestError(f"{USER_NAMES[name]} must hold exactly one value (one conversation per request), "
                           f"got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def _optional_text(request, name):
    value = _scalar(request, name)
    return None if value is None else _text(value)


def _strings(request, name) -> list[str]:
    arr = _optional(request, name)
    return [] if arr is None else [_text(v) for v in arr.reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.builder = RequestBuilder(params["model_dir"]["string_value"])

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            end_id, pad_id = _scalar(request, "END_ID"), _scalar(request, "PAD_ID")
            prepared = self.builder.build(
                _text(_scalar(request, "QUERY")),
                _scalar(request, "REQUEST_OUTPUT_LEN"),
                attributes=_optional_text(request, "ATTRIBUTES"),
                system=_optional_text(request, "SYSTEM"),
                history=_optional_text(request, "HISTORY"),
                stop_words=_strings(request, "STOP_WORDS_DICT"),
                bad_words=_strings(request, "BAD_WORDS_DICT"),
                end_id=None if end_id is None else int(end_id),
                pad_id=None if pad_id is None else int(pad_id),
            )
        except (RequestError, UnicodeDecodeError) as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {exc}"))
        ids = np.array([prepared.input_ids], dtype=np.int32)
        outputs = {
            "INPUT_ID": ids,
            "REQUEST_INPUT_LEN": np.array([[ids.shape[1]]], dtype=np.int32),
            "REQUEST_OUTPUT_LEN": np.array([[prepared.max_tokens]], dtype=np.int32),
            "STOP_WORDS_IDS": word_list(prepared.stop_words)[None],
            "BAD_WORDS_IDS": word_list(prepared.bad_words)[None],
            "OUT_END_ID": np.array([[prepared.end_id]], dtype=np.int32),
            "OUT_PAD_ID": np.array([[prepared.pad_id]], dtype=np.int32),
            "STOP_STRINGS": np.array([[s.encode("utf-8") for s in prepared.stop_strings]], dtype=np.object_),
            "PROMPT": np.array([[prepared.prompt.encode("utf-8")]], dtype=np.object_),
        }
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
