"""Label every assistant turn of a conversation file with a reward model (SteerLM step 2).

Scores come from a local `RewardScorer` (batched) or from the Triton `reward_model` (concurrent requests);
each is clamped and rounded with `AttributeSchema.from_scores`. Output goes to `OUT.partial`, one
conversation per line with its id, flushed and fsynced after every batch; a rerun after a crash drops a torn
last line, skips the ids already written and continues. The finished file is renamed to OUT, so OUT
exists only when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from steer_train.data import Conversation, jsonl_line, load_jsonl
from steerlm.reward import nemo_rm_text
from steerlm.schema import AttributeSchema
from steerlm.template import PromptTemplate, Turn


class Scorer(Protocol):
    """What scores conversations with a reward model: `steerlm.reward.RewardScorer` in this process, or
    `TritonScorer` through a server. One row of raw scores per conversation, in schema order."""

    def score(self, conversations: Sequence[Sequence[Turn]], system=None, batch_size: int = 8) -> np.ndarray: ...


CONTRACTS = ("steerlm", "nemo")


class TritonScorer:
    """A Triton reward server, by either contract (steerlm.reward module doc):
    `steerlm`: `conversation` JSON [1, 1] in, `scores` [1, n_attr] out (this package's `reward_model`);
    `nemo`: `sentences` [1, 1] in (the text NeMo-Aligner's attribute_annotate.py sends), `rewards` out
    (NeMo-Aligner's serve_reward_model.py, and this package's `reward_model` too)."""

    def __init__(self, url: str, concurrency: int = 8, model_name: str = "reward_model", contract: str = "steerlm",
                 template: PromptTemplate | None = None):
        import tritonclient.http as httpclient

        if contract not in CONTRACTS:
            raise ValueError(f"contract {contract!r} must be one of {', '.join(CONTRACTS)}")
        self.url = url.split("://", 1)[-1]
        self.model_name = model_name
        self.contract = contract
        self.template = template or PromptTemplate()
        self._output = "scores" if contract == "steerlm" else "rewards"
        self._client = httpclient.InferenceServerClient(self.url, concurrency=concurrency)
        self._http = httpclient

    def _request(self, turns: Sequence[Turn], system: str | None):
        if self.contract == "steerlm":
            payload = {"system": system, "turns": [{"question": t.question, "answer": t.answer} for t in turns]}
            name, text = "conversation", json.dumps(payload)
        else:
            name, text = "sentences", nemo_rm_text(self.template, turns, system)
        inp = self._http.InferInput(name, [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        return self._client.async_infer(self.model_name, [inp], outputs=[self._http.InferRequestedOutput(self._output)])

    def score(self, conversations, system=None, batch_size: int = 8) -> np.ndarray:
        """All requests go out at once; the client keeps `concurrency` of them in flight."""
        systems = list(system) if isinstance(system, (list, tuple)) else [system] * len(conversations)
        pending = [self._request(c, s) for c, s in zip(conversations, systems)]
        rows = []
        for request in pending:
            scores = request.get_result().as_numpy(self._output)
            if scores is None:
                raise RuntimeError(f"{self.model_name} at {self.url} returned no {self._output!r} output")
            rows.append(np.asarray(scores, dtype=np.float32).reshape(-1))
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def _resume(partial: Path) -> set[str]:
    """Ids already written; a torn last line (crash mid-write) is cut off."""
    if not partial.is_file():
        return set()
    data = partial.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    done = set()
    for line in good.splitlines():
        done.add(json.loads(line)["id"])
    if len(good) != len(data):
        with partial.open("r+b") as f:
            f.truncate(len(good))
    return done


def annotate(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    scorer: Scorer,
    schema: AttributeSchema,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, int]:
    """Annotate and return counts {conversations, turns, skipped_done}; see the module doc for resuming."""
    from tqdm import tqdm

    out = Path(output_path)
    partial = out.with_name(out.name + ".partial")
    convs = load_jsonl(input_path, schema)
    ids = [c.id for c in convs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{input_path}: conversation id {dup!r} appears twice; ids must be unique to resume safely")
    if out.exists():
        raise FileExistsError(f"{out} already exists (a finished annotation); remove it to annotate again")
    done = _resume(partial)
    todo = [c for c in convs if c.id not in done]
    n_turns = 0
    with partial.open("a", encoding="utf-8") as f, tqdm(total=len(convs), initial=len(convs) - len(todo), desc="annotate",
                                                        disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            # One scoring item per assistant turn: the conversation up to and including that answer.
            items = [(c, i) for c in chunk for i in range(len(c.turns))]
            scores = scorer.score([list(c.turns[: i + 1]) for c, i in items], [c.system for c, _ in items], batch_size)
            if scores.shape != (len(items), len(schema)):
                raise ValueError(f"reward model returned scores of shape {scores.shape}; expected {len(schema)} per turn "
                                 f"for attributes {', '.join(schema.names)}")
            labels = iter(schema.encode(schema.from_scores(row)) for row in scores)
            for c in chunk:
                turns = tuple(Turn(t.question, t.answer, next(labels)) for t in c.turns)
                f.write(jsonl_line(Conversation(c.id, turns, c.system)))
            f.flush()
            os.fsync(f.fileno())
            n_turns += len(items)
            bar.update(len(chunk))
    os.replace(partial, out)
    return {"conversations": len(todo), "turns": n_turns, "skipped_done": len(done)}
