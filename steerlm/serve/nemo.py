"""NeMo's `NemoQueryLLM` against a SteerLM checkpoint: raw prompts in, whole answers out.

NeMo's deploy script serves a model under a name of the user's choosing and its query class sends already
rendered prompts (the model cards' code). The model `python -m steerlm.serve --triton-model-name NAME` adds
takes exactly those tensors, parses each prompt strictly back into its conversation (`steerlm.rawprompt`:
full, in-schema label lines only, no smuggled control strings, byte-for-byte re-rendering), validates and
renders it with the same `RequestBuilder` as the `steerlm` ensemble, and generates through the generator's
local socket like `generator_whole`. So a card's prompt gives the ensemble's answer for that conversation.

Tensor names and types (batch dim first, one row per prompt), as NemoQueryLLM.query_llm sends them:
NVIDIA/NeMo nemo/deploy/query_llm.py (commit ef938b2e68e8) and NVIDIA-NeMo/Export-Deploy
nemo_deploy/llm/query_llm.py (commit bd65b2c052da); the answer is the BYTES output `outputs`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from steerlm.rawprompt import PromptParseError, parse_prompt
from steerlm.serve.requests import PreparedRequest, RequestBuilder, RequestError

# name -> (Triton type, dims); all optional except prompts.
NEMO_INPUTS: dict[str, tuple[str, str]] = {
    "prompts": ("TYPE_STRING", "1"),
    "max_output_token": ("TYPE_INT64", "1"),  # NeMo 23.10..24.x
    "max_output_len": ("TYPE_INT64", "1"),  # Export-Deploy
    "min_output_len": ("TYPE_INT64", "1"),
    "top_k": ("TYPE_INT64", "1"),
    "top_p": ("TYPE_FP32", "1"),
    "temperature": ("TYPE_FP32", "1"),
    "random_seed": ("TYPE_INT64", "1"),
    "stop_words_list": ("TYPE_STRING", "-1"),
    "bad_words_list": ("TYPE_STRING", "-1"),
}
# NeMo input -> SteerLM sampling field
_SAMPLING = {"top_k": "top_k", "top_p": "top_p", "temperature": "temperature", "random_seed": "seed",
             "min_output_len": "min_tokens"}


def nemo_inputs_pbtxt() -> str:
    return ",\n".join(f'  {{ name: "{n}", data_type: {t}, dims: [ {d} ]{"" if n == "prompts" else ", optional: true"} }}'
                      for n, (t, d) in NEMO_INPUTS.items())


class NemoPrompts:
    """Turns one row of NemoQueryLLM's tensors into the signed-ready request the generator runs."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.builder = RequestBuilder(model_dir)

    def prepare(self, prompt: str, values: Mapping[str, Any], stop_words: Sequence[str] = (),
                bad_words: Sequence[str] = ()) -> PreparedRequest:
        """`values`: this row's scalar inputs by NeMo name (those sent). Raises RequestError saying why not."""
        token, length = values.get("max_output_token"), values.get("max_output_len")
        if token is not None and length is not None and token != length:
            raise RequestError(f"max_output_token and max_output_len are two names of one limit; got both, and "
                               f"they differ ({token} and {length})")
        max_tokens = token if token is not None else length
        if max_tokens is None:
            raise RequestError("max_output_token (or max_output_len) is required: the number of tokens to generate")
        try:
            parsed = parse_prompt(self.builder.spec, prompt)
        except PromptParseError as exc:
            raise RequestError(f"not a SteerLM prompt of this model: {exc}") from None
        sampling = {field: values[name] for name, field in _SAMPLING.items() if values.get(name) is not None}
        try:
            prepared = self.builder.build(parsed.question, max_tokens, attributes=parsed.labels,
                                          system=parsed.system, history=json.dumps(parsed.history()),
                                          stop_words=stop_words, bad_words=bad_words, sampling=sampling)
        except RequestError as exc:
            message = str(exc).replace("max_tokens", "max_output_token").replace("min_tokens", "min_output_len")
            raise RequestError(message.replace("seed", "random_seed")) from None
        # The model must see exactly the prompt the client sent (parse_prompt proved it re-renders so).
        if prepared.prompt != prompt:
            raise RequestError("prompts: the prompt does not re-render to itself through this model's template")
        return prepared
