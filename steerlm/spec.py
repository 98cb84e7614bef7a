"""`steerlm.json`: the schema and template a checkpoint carries, so serving another model needs no code change."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from steerlm.schema import HELPSTEER, PRESETS, AttributeSchema, SchemaError
from steerlm.template import PromptTemplate, Turn

SPEC_FILE = "steerlm.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SteerSpec:
    schema: AttributeSchema = HELPSTEER
    template: PromptTemplate = field(default_factory=PromptTemplate)
    # "generator" for a SteerLM chat model, "reward_model" for an attribute-prediction model.
    kind: str = "generator"
    extra: Mapping = field(default_factory=dict)

    def prompt_turns(
        self,
        question: str,
        attributes: Mapping[str, int] | None = None,
        history: Sequence[Mapping] | Sequence[Turn] = (),
    ) -> list[Turn]:
        """Turns for a request: earlier turns (each {question, answer, optional labels/attributes}) + the open one."""
        turns = [self.history_turn(h, i) for i, h in enumerate(history)]
        turns.append(Turn(question, None, self.schema.encode(attributes)))
        return turns

    def history_turn(self, h: Mapping | Turn, index: int = 0) -> Turn:
        if isinstance(h, Turn):
            return h
        if not isinstance(h, Mapping):
            raise SchemaError(f"history[{index}] must be an object with 'question' and 'answer'")
        for key in ("question", "answer"):
            if not isinstance(h.get(key), str):
                raise SchemaError(f"history[{index}].{key} must be a string")
        labels = h.get("labels")
        if labels is None:
            attrs = h.get("attributes") or {}
            if isinstance(attrs, str):
                attrs = self.schema.parse(attrs)
            labels = self.schema.encode(attrs)
        else:
            labels = self.schema.encode(self.schema.parse(labels))
        return Turn(h["question"], h["answer"], labels)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "attributes": self.schema.to_dict(),
            "template": self.template.to_dict(),
            **dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "SteerSpec":
        d = dict(d)
        known = {"format_version", "kind", "attributes", "template"}
        return cls(
            schema=AttributeSchema.from_dict(d["attributes"]),
            template=PromptTemplate.from_dict(d.get("template", {})),
            kind=d.get("kind", "generator"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def preset(cls, name: str, **kw) -> "SteerSpec":
        try:
            return cls(schema=PRESETS[name], **kw)
        except KeyError:
            raise SchemaError(f"unknown schema preset {name!r}; choose from {', '.join(PRESETS)}") from None


def load_spec(model_dir: str | os.PathLike) -> SteerSpec:
    path = Path(model_dir) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a SteerLM checkpoint carries its attribute schema in {SPEC_FILE} "
            "(write one with `python -m steer_train init-tiny` or `steerlm.save_spec`)"
        )
    return SteerSpec.from_dict(json.loads(path.read_text()))


def save_spec(model_dir: str | os.PathLike, spec: SteerSpec) -> None:
    """Write steerlm.json and, when the directory has a tokenizer_config.json, its chat template."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        cfg = json.loads(tok_cfg.read_text())
        cfg["chat_template"] = spec.template.chat_template()
        tok_cfg.write_text(json.dumps(cfg, indent=2) + "\n")
