"""The attribute-prediction (reward) model: one code path for rendering, tokenizing, pooling and the head.

Training (`steer_train rm`), local annotation and the Triton `reward_model` all score through this module,
so a conversation gets the same token ids and the same scores everywhere (upstream,
scores drifted between training and serving because BOS/EOS handling differed).

Checkpoint layout (a directory): the backbone saved with `save_pretrained` (config.json, model.safetensors),
the tokenizer (tokenizer.json ...), steerlm.json with kind "reward_model" and `pooling` ("last" for causal
LMs, "mean" for encoders), optional `attribute_weights` ({attribute: weight}, the scalar reward is their
dot product with the scores), and reward_head.safetensors with `weight` [n_attr, hidden] and `bias` [n_attr].

The prompt convention, the same in training, local scoring and both serving contracts: the conversation is
rendered with the SteerLM template with every label empty (`<extra_id_1>Assistant\n<extra_id_2>\n{answer}\n`),
tokenized with control tokens recognised only in template text, with no BOS and no EOS added (NeMo-Aligner's
reward server tokenizes with add_BOS=False, add_EOS=False as well), and a conversation longer than
`max_length` keeps its end. NeMo-Aligner's own clients (`attribute_annotate.py`) send the text of
`nemo_rm_text` instead: system, `<extra_id_1>User\n{q}\n<extra_id_1>Assistant\n{a}\n` per turn, then the label
prefix `<extra_id_2>`; `parse_nemo_rm_text` turns it back into turns, so both contracts score the same tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from steerlm.schema import AttributeSchema
from steerlm.spec import SteerSpec, load_spec, save_spec
from steerlm.template import PromptTemplate, Turn
from steerlm.tokenize import encode_segments, load_tokenizer

HEAD_FILE = "reward_head.safetensors"
POOLINGS = ("last", "mean")
# Encoders pool by averaging; everything else is treated as a causal LM and pools its last token.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert", "deberta", "deberta-v2"}
DEFAULT_MAX_LENGTH = 4096


def default_pooling(model_type: str) -> str:
    return "mean" if model_type in ENCODER_TYPES else "last"


class RewardModel(nn.Module):
    """Backbone hidden states -> pooled vector -> one linear output per attribute."""

    def __init__(self, backbone: nn.Module, n_attr: int, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} must be one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(backbone.config.hidden_size, n_attr)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:  # right-padded batches: the last real token of each row
            last = attention_mask.sum(1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(pooled.float())


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


class RewardScorer:
    """Scores conversations whose every turn has an answer; the last answer is the one being rated."""

    def __init__(self, model: RewardModel, tokenizer, spec: SteerSpec, device: str = "cpu", max_length: int | None = None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.spec = spec
        self.device = device
        limit = getattr(model.backbone.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        self.max_length = min(max_length or spec.extra.get("max_length", DEFAULT_MAX_LENGTH), limit)
        pad = tokenizer.token_to_id("<pad>")
        self.pad_id = pad if pad is not None else 0

    def encode(self, turns: Sequence[Turn], system: str | None = None) -> list[int]:
        """Token ids of the rendered conversation (every answer present, labels empty).

        Long conversations keep their end: the answer being rated is what the last token summarises."""
        return self.encode_full(turns, system)[-self.max_length :]

    def encode_full(self, turns: Sequence[Turn], system: str | None = None) -> list[int]:
        """`encode` before truncation (its length tells whether the conversation exceeded max_length)."""
        if not turns or any(t.answer is None for t in turns):
            raise ValueError("a conversation to score needs at least one turn and an answer in every turn")
        blank = [Turn(t.question, t.answer, "") for t in turns]
        ids, _ = encode_segments(self.tokenizer, self.spec.template.segments(blank, system))
        return ids

    @property
    def attribute_weights(self) -> dict[str, float] | None:
        weights = self.spec.extra.get("attribute_weights")
        return dict(weights) if weights else None

    def reward(self, scores: np.ndarray) -> np.ndarray | None:
        """Scalar rewards [n] from score rows [n, n_attr] and the checkpoint's attribute weights (None without)."""
        weights = self.attribute_weights
        if weights is None:
            return None
        vector = np.array([weights.get(n, 0.0) for n in self.spec.schema.names], dtype=np.float32)
        return np.asarray(scores, dtype=np.float32) @ vector

    @torch.no_grad()
    def score(
        self,
        conversations: Sequence[Sequence[Turn]],
        system: str | None | Sequence[str | None] = None,
        batch_size: int = 8,
    ) -> np.ndarray:
        """Raw predictions [n, n_attr] float32 in schema order. `system` is one prompt for all or one per conversation."""
        systems = list(system) if isinstance(system, (list, tuple)) else [system] * len(conversations)
        if len(systems) != len(conversations):
            raise ValueError(f"got {len(systems)} system prompts for {len(conversations)} conversations")
        out = np.zeros((len(conversations), len(self.spec.schema)), dtype=np.float32)
        for start in range(0, len(conversations), batch_size):
            seqs = [self.encode(c, s) for c, s in zip(conversations[start : start + batch_size], systems[start : start + batch_size])]
            ids, mask = pad_batch(seqs, self.pad_id, self.device)
            out[start : start + len(seqs)] = self.model(ids, mask).float().cpu().numpy()
        return out

    def labels(self, scores: Sequence[float]) -> str:
        """Clamped, rounded label string for one row of `score`."""
        return self.spec.schema.encode(self.spec.schema.from_scores(scores))


def parse_attribute_weights(text: str, schema: AttributeSchema) -> dict[str, float]:
    """`helpfulness=0.65,correctness=0.8` -> {name: weight}; unnamed attributes weigh 0."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in schema.names:
            raise ValueError(f"attribute weight {item!r}: expected NAME=NUMBER with NAME one of {', '.join(schema.names)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"attribute weight {item!r}: {value!r} is not a number") from None
    if not weights:
        raise ValueError("attribute weights are empty; give NAME=NUMBER pairs such as helpfulness=0.65,correctness=0.8")
    return weights


def _nemo_pieces(template: PromptTemplate) -> tuple[str, str, str, str]:
    """(system prefix, user header, assistant header, label prefix) of the NeMo-Aligner RM text."""
    system_prefix = template.system.partition("{system}")[0]
    user_header = template.user.partition("{question}")[0]
    head = template.assistant.partition("{labels}")[0]
    label_prefix = next(t for t in template.control_tokens if head.endswith(t))
    return system_prefix, user_header, head[: -len(label_prefix)], label_prefix


def nemo_rm_text(template: PromptTemplate, turns: Sequence[Turn], system: str | None = None) -> str:
    """The text NeMo-Aligner's attribute_annotate.py sends its reward server (module doc)."""
    system_prefix, user_header, assistant_header, label_prefix = _nemo_pieces(template)
    text = f"{system_prefix}{template.default_system if system is None else system}\n"
    for t in turns:
        text += f"{user_header}{t.question}\n{assistant_header}{t.answer}\n"
    return text + label_prefix


def parse_nemo_rm_text(template: PromptTemplate, text: str) -> tuple[str, list[Turn]]:
    """(system, turns) of a `nemo_rm_text`; ValueError says what is missing."""
    system_prefix, user_header, assistant_header, label_prefix = _nemo_pieces(template)
    shape = f"{system_prefix!r}SYSTEM\\n ({user_header!r}Q\\n{assistant_header!r}A\\n)+ {label_prefix!r}"
    if not text.startswith(system_prefix) or not text.endswith("\n" + label_prefix):
        raise ValueError(f"sentence must look like {shape}")
    body = text[len(system_prefix) : -len(label_prefix)]
    user_sep, assistant_sep = "\n" + user_header, "\n" + assistant_header
    system, sep, rest = body.partition(user_sep)
    if not sep:
        raise ValueError(f"sentence has no user turn; it must look like {shape}")
    if not rest.endswith("\n"):
        raise ValueError(f"sentence must end with the answer, a newline and {label_prefix!r}")
    turns = []
    for i, chunk in enumerate(rest[:-1].split(user_sep)):
        question, sep, answer = chunk.partition(assistant_sep)
        if not sep:
            raise ValueError(f"sentence turn {i} has no assistant answer; it must look like {shape}")
        turns.append(Turn(question, answer, ""))
    return system, turns


def save_reward_model(out: str | os.PathLike, model: RewardModel, hf_tokenizer, spec: SteerSpec, max_length: int,
                      attribute_weights: Mapping[str, float] | None = None) -> Path:
    """Write the checkpoint; steerlm.json goes last, so a directory with it is complete."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out, safe_serialization=True)
    hf_tokenizer.chat_template = spec.template.chat_template()
    hf_tokenizer.save_pretrained(out)
    head = {"weight": model.head.weight.detach().float().cpu().contiguous(), "bias": model.head.bias.detach().float().cpu().contiguous()}
    save_file(head, str(out / HEAD_FILE))
    extra = {**dict(spec.extra), "pooling": model.pooling, "max_length": max_length}
    if attribute_weights:
        extra["attribute_weights"] = dict(attribute_weights)
    save_spec(out, SteerSpec(spec.schema, spec.template, "reward_model", extra))
    return out


def load_reward_model(model_dir: str | os.PathLike, device: str = "cpu") -> RewardScorer:
    from safetensors.torch import load_file
    from transformers import AutoModel

    model_dir = Path(model_dir)
    spec = load_spec(model_dir)
    if spec.kind != "reward_model":
        raise ValueError(f"{model_dir} is a {spec.kind!r} checkpoint, not a reward model (steerlm.json kind)")
    head_path = model_dir / HEAD_FILE
    if not head_path.is_file():
        raise FileNotFoundError(f"{head_path} not found: a reward model checkpoint carries its linear head there")
    backbone = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    model = RewardModel(backbone, len(spec.schema), spec.extra.get("pooling", "last"))
    head = load_file(str(head_path))
    if tuple(head["weight"].shape) != tuple(model.head.weight.shape):
        raise ValueError(
            f"{head_path}: head weight {tuple(head['weight'].shape)} does not fit "
            f"{len(spec.schema)} attributes x hidden {backbone.config.hidden_size}"
        )
    model.head.load_state_dict(head)
    return RewardScorer(model, load_tokenizer(model_dir), spec, device)
