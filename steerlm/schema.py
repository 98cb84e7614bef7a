"""Attribute schemas and the `key:value,...` label strings SteerLM models are conditioned on.

The attribute set, its order, its range and its defaults belong to the model, not to the code, so a
schema is plain data that travels inside every checkpoint (see `steerlm.spec`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping


def format_labels(values: Mapping[str, int]) -> str:
    """`name:value` pairs joined by commas, in the given order and unchecked: the label form for a client that
    does not know the model's schema (the server validates). With a schema, use `AttributeSchema.encode`."""
    return ",".join(f"{name}:{int(value)}" for name, value in values.items())


class SchemaError(ValueError):
    """A label string or attribute value does not fit the model's schema."""


@dataclass(frozen=True)
class Attribute:
    name: str
    min: int = 0
    max: int = 4
    default: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in ",: \n"):
            raise SchemaError(f"attribute name {self.name!r} must be non-empty without ',', ':' or whitespace")
        if not self.min <= self.default <= self.max:
            raise SchemaError(f"attribute {self.name}: default {self.default} outside {self.min}..{self.max}")

    def check(self, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"attribute {self.name}: value {value!r} is not an integer ({self.min}..{self.max})")
        if not self.min <= value <= self.max:
            raise SchemaError(f"attribute {self.name}: value {value} outside allowed range {self.min}..{self.max}")
        return value

    def clamp_round(self, score: float) -> int:
        """Turn a predicted score into a label value: clamp to the range, then round (as NeMo-Aligner's
attribute annotation does, docs/user-guide/steerlm.rst)."""
        return int(round(min(max(float(score), self.min), self.max)))


@dataclass(frozen=True)
class AttributeSchema:
    attributes: tuple[Attribute, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [a.name for a in self.attributes]
        if not names:
            raise SchemaError("a schema needs at least one attribute")
        if len(set(names)) != len(names):
            raise SchemaError(f"duplicate attribute names in {names}")

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def __len__(self) -> int:
        return len(self.attributes)

    def __getitem__(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise SchemaError(f"unknown attribute {name!r}; this model's attributes are: {', '.join(self.names)}")

    def defaults(self) -> dict[str, int]:
        return {a.name: a.default for a in self.attributes}

    def complete(self, values: Mapping[str, int] | None = None) -> dict[str, int]:
        """Validate `values` and fill the attributes left out with their defaults, in schema order."""
        values = dict(values or {})
        for name, value in values.items():
            self[name].check(value)
        return {a.name: values.get(a.name, a.default) for a in self.attributes}

    def encode(self, values: Mapping[str, int] | None = None, *, partial: bool = False) -> str:
        """The label string in schema order: complete (`quality:4,toxicity:0,...`, left-out attributes at their
        defaults, what a prompt carries) or, with partial=True, only the given attributes (what a data set
        that rated some attributes carries; NeMo-Aligner masks the others out of the reward-model loss).
        This and `parse` are the only writer and reader of label strings in the package."""
        values = dict(values or {})
        complete = self.complete(values)
        return format_labels({k: v for k, v in complete.items() if not partial or k in values})

    def parse(self, text: str, *, partial: bool = True) -> dict[str, int]:
        """Parse `name:value,...` (also `name=value`); with partial=False every attribute must be present."""
        values: dict[str, int] = {}
        text = (text or "").strip()
        if text:
            for item in text.split(","):
                item = item.strip()
                if not item:
                    continue
                sep = ":" if ":" in item else "="
                name, _, raw = item.partition(sep)
                name, raw = name.strip(), raw.strip()
                if not _:
                    raise SchemaError(f"attribute item {item!r} must look like name:value")
                attr = self[name]
                if name in values:
                    raise SchemaError(f"attribute {name!r} given twice")
                try:
                    value = int(raw)
                except ValueError:
                    raise SchemaError(
                        f"attribute {name}: value {raw!r} is not an integer ({attr.min}..{attr.max})"
                    ) from None
                values[name] = attr.check(value)
        if not partial:
            missing = [n for n in self.names if n not in values]
            if missing:
                raise SchemaError(f"label string lacks attributes: {', '.join(missing)}")
        return values

    def from_scores(self, scores: Iterable[float]) -> dict[str, int]:
        scores = list(scores)
        if len(scores) != len(self.attributes):
            raise SchemaError(f"expected {len(self.attributes)} scores, got {len(scores)}")
        return {a.name: a.clamp_round(s) for a, s in zip(self.attributes, scores)}

    def to_dict(self) -> list[dict]:
        return [asdict(a) for a in self.attributes]

    @classmethod
    def from_dict(cls, items: Iterable[Mapping]) -> "AttributeSchema":
        try:
            return cls(tuple(Attribute(**dict(item)) for item in items))
        except TypeError as exc:
            raise SchemaError(f"bad attribute entry: {exc}") from None


def _schema(names: str, lo: int, hi: int, defaults: Mapping[str, int]) -> AttributeSchema:
    return AttributeSchema(tuple(Attribute(n, lo, hi, defaults.get(n, lo)) for n in names.split(",")))


# NeMo-Aligner / HelpSteer order: 4 OpenAssistant attributes, then the 5 HelpSteer ones, all 0..4.
HELPSTEER = _schema(
    "quality,toxicity,humor,creativity,helpfulness,correctness,coherence,complexity,verbosity",
    0,
    4,
    # Defaults follow the label string of the public model cards: best quality, no toxicity or humor.
    {"quality": 4, "helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 4, "verbosity": 4},
)

# The first public SteerLM Llama-2 13B model: 7 attributes on a 0..9 scale.
STEERLM_13B = _schema(
    "quality,toxicity,humor,creativity,violence,helpfulness,not_appropriate",
    0,
    9,
    {"quality": 9, "helpfulness": 9},
)

PRESETS: dict[str, AttributeSchema] = {"helpsteer": HELPSTEER, "steerlm-13b": STEERLM_13B}
