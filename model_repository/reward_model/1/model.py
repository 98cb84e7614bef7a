"""Triton python model `reward_model`: attribute scores for conversations, two contracts (see the config)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from steerlm.reward import load_reward_model, parse_nemo_rm_text
from steerlm.template import Turn


def _strings(tensor, name):
    raw = tensor.as_numpy().reshape(-1)
    if raw.size == 0:
        raise ValueError(f"{name} is empty")
    return [r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in raw]


def _conversation(text):
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
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

    def _parse(self, request):
        """('conversation'|'sentences', [(system, turns), ...]) of one request."""
        conv = pb_utils.get_input_tensor_by_name(request, "conversation")
        sent = pb_utils.get_input_tensor_by_name(request, "sentences")
        if (conv is None) == (sent is None):
            raise ValueError("send exactly one of `conversation` (SteerLM JSON) or `sentences` (NeMo-Aligner text)")
        if conv is not None:
            return "conversation", [_conversation(t) for t in _strings(conv, "conversation")]
        template = self.scorer.spec.template
        return "sentences", [parse_nemo_rm_text(template, t) for t in _strings(sent, "sentences")]

    def _response(self, contract, rows, scores):
        scores = np.asarray(scores, dtype=np.float32)
        tensors = []
        if contract == "conversation":
            labels = [self.scorer.labels(row.tolist()).encode("utf-8") for row in scores]
            tensors += [pb_utils.Tensor("scores", scores),
                        pb_utils.Tensor("attributes", np.tile(self.attributes, (len(rows), 1))),
                        pb_utils.Tensor("labels", np.array(labels, dtype=np.object_).reshape(-1, 1))]
        else:
            exceeded = [len(self.scorer.encode_full(turns, system)) > self.scorer.max_length for system, turns in rows]
            tensors += [pb_utils.Tensor("rewards", scores),
                        pb_utils.Tensor("exceeded", np.array(exceeded, dtype=np.bool_).reshape(-1, 1))]
        reward = self.scorer.reward(scores)
        if reward is not None:
            tensors.append(pb_utils.Tensor("reward", reward.astype(np.float32).reshape(-1, 1)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                parsed.append((i, *self._parse(request)))
            except (ValueError, UnicodeDecodeError) as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {exc}"))
        # One scoring pass over every row of every request the batcher merged.
        flat = [row for _, _, rows in parsed for row in rows]
        if flat:
            scores = self.scorer.score([t for _, t in flat], system=[s for s, _ in flat])
            at = 0
            for i, contract, rows in parsed:
                responses[i] = self._response(contract, rows, scores[at : at + len(rows)])
                at += len(rows)
        return responses
