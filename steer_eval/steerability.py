"""Steerability evaluation: sweep each attribute over its scale, generate, measure with the reward model.

For every chosen attribute and every value on its scale (the other attributes at the model's defaults),
each prompt is answered once, then the reward model scores every answer. `stats` turns the scores
into Spearman / MAE / monotonicity / side effects; `report` writes eval.json, eval.md and eval.png.
Answers come from the served ensemble over gRPC (`--server`) or from the checkpoint in-process.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence

import numpy as np

from steer_eval.prompts import Prompt
from steer_eval.report import steer_plot, steer_table
from steer_eval.stats import steerability
from steer_eval.weak_labels import word_count
from steerlm.files import write_atomic, write_json
from steerlm.schema import AttributeSchema, SchemaError
from steerlm.spec import SteerSpec
from steerlm.template import Turn

if TYPE_CHECKING:
    from steerlm.reward import RewardScorer

# Llama2-70B-SteerLM-Chat documents these as the knobs users turn; others (quality, toxicity, ...)
# are held at their defaults in normal use, so they are swept only when asked for.
USER_FACING = ("creativity", "complexity", "verbosity")


@dataclass(frozen=True)
class Decoding:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


class Generator(Protocol):
    def generate(self, requests: Sequence[tuple[str, Mapping[str, int]]], decoding: Decoding) -> list[str]:
        """One answer per (question, attribute values) request, in order."""


class ServerGenerator:
    """Answers from the `steerlm` ensemble over gRPC, several requests in flight so the server batches them."""

    def __init__(self, url: str, concurrency: int = 8, protocol: str = "grpc"):
        from steerlm_client import SteerClient

        self.client = SteerClient(url, protocol=protocol)  # thread-safe: one connection per call
        self.concurrency = concurrency

    def _one(self, request: tuple[str, Mapping[str, int]], decoding: Decoding) -> str:
        question, attributes = request
        # The ensemble samples like TensorRT-LLM: greedy with top_k 1, sampling when top_p > 0.
        kwargs = {"top_k": 1} if decoding.temperature == 0 else {"temperature": decoding.temperature, "top_p": decoding.top_p}
        return self.client.generate(
            question, attributes=dict(attributes), max_tokens=decoding.max_tokens, seed=decoding.seed, **kwargs
        )

    def generate(self, requests: Sequence[tuple[str, Mapping[str, int]]], decoding: Decoding) -> list[str]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda r: self._one(r, decoding), requests))


class LocalGenerator:
    """Answers from the checkpoint in this process (`steer_train.sample`, tokenized exactly as the server does)."""

    def __init__(self, model_dir: str | Path, batch_size: int = 16):
        from steer_train import sample

        self._sample = sample
        self.model = sample.load_local_model(model_dir)
        self.batch_size = batch_size

    def generate(self, requests: Sequence[tuple[str, Mapping[str, int]]], decoding: Decoding) -> list[str]:
        return self._sample.generate(
            self.model,
            [q for q, _ in requests],
            [dict(a) for _, a in requests],
            max_new_tokens=decoding.max_tokens,
            temperature=decoding.temperature,
            seed=decoding.seed,
            top_p=decoding.top_p,
            batch_size=self.batch_size,
        )


def choose_attributes(schema: AttributeSchema, names: str | None) -> list[str]:
    """The attributes to sweep: the comma-separated `names`, else the user-facing ones this model has, else all."""
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        for n in chosen:
            schema[n]  # raises with the list of valid names
        return chosen
    return [n for n in schema.names if n in USER_FACING] or list(schema.names)


def sweep_values(schema: AttributeSchema, attribute: str, values: str | None) -> list[int]:
    """Every value of the attribute's scale, or the comma-separated `values` (checked against the scale)."""
    attr = schema[attribute]
    if not values:
        return list(range(attr.min, attr.max + 1))
    try:
        out = sorted({int(v) for v in values.split(",") if v.strip()})
    except ValueError:
        raise SchemaError(f"--values must be comma-separated integers, got {values!r}") from None
    for v in out:
        attr.check(v)
    return out


def steer_eval(
    prompts: Sequence[Prompt],
    gen_spec: SteerSpec,
    scorer: RewardScorer,
    generator: Generator,
    attributes: Sequence[str],
    values: str | None = None,
    decoding: Decoding = Decoding(),
    progress: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Run the sweep and return {config, summaries, records}; see the module docstring."""
    rm_names = scorer.spec.schema.names
    missing = [a for a in attributes if a not in rm_names]
    if missing:
        raise SchemaError(
            f"the reward model does not measure {', '.join(missing)}; it measures {', '.join(rm_names)}"
        )
    from tqdm import tqdm

    records: list[dict] = []
    summaries: list[dict] = []
    ranges: dict[str, tuple[int, int]] = {}
    for name in attributes:
        sweep = sweep_values(gen_spec.schema, name, values)
        attr = gen_spec.schema[name]
        ranges[name] = (attr.min, attr.max)
        requests = [(p, v, gen_spec.schema.complete({name: v})) for v in sweep for p in prompts]
        progress(f"{name}: {len(sweep)} values x {len(prompts)} prompts = {len(requests)} answers")
        answers: list[str] = []
        chunk = 16
        with tqdm(total=len(requests), desc=f"generate {name}", unit="answer") as bar:
            for i in range(0, len(requests), chunk):
                part = requests[i : i + chunk]
                answers += generator.generate([(p.question, s) for p, _, s in part], decoding)
                bar.update(len(part))
        scores = scorer.score([[Turn(p.question, a, "")] for (p, _, _), a in zip(requests, answers)])
        measured = {n: scores[:, j].tolist() for j, n in enumerate(rm_names)}
        requested = [v for _, v, _ in requests]
        summary = steerability(requested, measured, name, ranges[name])
        words = np.array([word_count(a) for a in answers], dtype=float)
        req = np.array(requested)
        summary["mean_words_by_value"] = {str(v): float(words[req == v].mean()) for v in sweep}
        summaries.append(summary)
        for (p, v, setting), answer, n_words, row in zip(requests, answers, words, scores):
            records.append(
                {
                    "prompt_id": p.id,
                    "attribute": name,
                    "requested": v,
                    "attributes": setting,
                    "question": p.question,
                    "answer": answer,
                    "words": int(n_words),
                    "scores": dict(zip(rm_names, map(float, row))),
                }
            )
    return {
        "config": {
            "prompts": len(prompts),
            "attributes": list(attributes),
            "decoding": decoding.__dict__,
            "defaults": gen_spec.schema.defaults(),
            "ranges": ranges,
        },
        "summaries": summaries,
        "records": records,
    }


def write_eval(result: dict, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """eval.json (summaries + every answer), eval.md (the table) and eval.png (one panel per attribute)."""
    out_dir = Path(out_dir)
    points = {
        s["attribute"]: (
            [r["requested"] for r in result["records"] if r["attribute"] == s["attribute"]],
            [r["scores"][s["attribute"]] for r in result["records"] if r["attribute"] == s["attribute"]],
        )
        for s in result["summaries"]
    }
    ranges = {k: tuple(v) for k, v in result["config"]["ranges"].items()}
    return {
        "json": write_json(out_dir / "eval.json", result),
        "markdown": write_atomic(out_dir / "eval.md", markdown(result)),
        "plot": steer_plot(out_dir / "eval.png", result["summaries"], points, ranges, title),
    }


def markdown(result: dict) -> str:
    words = "\n".join(
        f"- {s['attribute']}: " + ", ".join(f"{v}: {w:.0f}" for v, w in s["mean_words_by_value"].items())
        for s in result["summaries"]
    )
    cfg = result["config"]
    return (
        f"Steerability over {cfg['prompts']} prompts (other attributes at their defaults; measured by the reward model)\n\n"
        + steer_table(result["summaries"])
        + "\nMean answer length in words per requested value:\n\n"
        + words
        + "\n"
    )
