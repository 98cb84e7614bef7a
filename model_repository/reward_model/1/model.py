"""Triton python model `reward_model`: attribute scores for a conversation (contract in the config)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from steerlm.reward import load_reward_model
from steerlm.template import Turn


def _conversation(request):
    raw = pb_utils.get_input_tensor_by_name(request, "conversation").as_numpy().reshape(-1)
    if raw.size != 1:
        raise ValueError(f"conversation must hold exactly one JSON document, got {raw.size}")
    try:
        doc = json.loads(raw[0])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"conversation is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("turns"), list) or not doc["turns"]:
        raise ValueError('conversation must be {"system": str|null, "turns": [{"question": str, "answer": str}, ...]}')
    system = doc.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("conversation.system must be a string or null")
    turns = []
    for i, t in enumerate(doc["turns"]):
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("question", "answer")):
            raise ValueError(f"conversation.turns[{i}] must have string fields question and answer")
        turns.append(Turn(t["question"], t["answer"], ""))
    return system, turns


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.scorer = load_reward_model(params["model_dir"]["string_value"])
        self.attributes = np.array([n.encode("utf-8") for n in self.scorer.spec.schema.names], dtype=np.object_)

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                parsed.append((i, *_conversation(request)))
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {exc}"))
        if parsed:
            scores = self.scorer.score([p[2] for p in parsed], system=[p[1] for p in parsed])
            for (i, _, _), row in zip(parsed, np.asarray(scores, dtype=np.float32)):
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("scores", row),
                    pb_utils.Tensor("attributes", self.attributes),
                    pb_utils.Tensor("labels", np.array([self.scorer.labels(row.tolist()).encode("utf-8")],
                                                       dtype=np.object_)),
                ])
        return responses
