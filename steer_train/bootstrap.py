"""SteerLM step 4 (bootstrapping): sample responses under varied attributes, label them with the reward
model, and fine-tune the SFT model again on the re-labelled set.

The labels written are the reward model's (clamped, rounded) judgement of each response, not the
attributes it was sampled with: the model learns what its answers actually look like.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from steer_train.data import Conversation, load_jsonl, write_jsonl
from steer_train.sample import generate, load_local_model
from steer_train.sft import SFTConfig, train
from steerlm.files import write_atomic
from steerlm.reward import load_reward_model
from steerlm.template import Turn


def read_prompts(path: str, schema) -> list[tuple[list[Turn], str, str | None]]:
    """(history, question, system) per prompt: a .txt file has one question per line; a conversation JSONL
    contributes its last question with the turns before it as history."""
    if path.endswith(".txt"):
        return [([], line.strip(), None) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(list(c.turns[:-1]), c.turns[-1].question, c.system) for c in load_jsonl(path, schema)]


def bootstrap(
    sft: SFTConfig,
    reward_model: str,
    prompts: str,
    samples_per_prompt: int = 4,
    vary: Sequence[str] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    batch_size: int = 8,
) -> Path:
    """`sft.model` is the SFT checkpoint to sample from and fine-tune; `sft.data` is ignored and replaced by the
    re-labelled set written to `sft.out`/bootstrap.jsonl. Returns the fine-tuned checkpoint directory."""
    out = Path(sft.out)
    gen = load_local_model(sft.model)
    schema = gen.spec.schema
    names = list(vary) if vary else schema.names
    for n in names:
        schema[n]  # unknown names raise a SchemaError listing the valid ones
    rng = random.Random(sft.seed)
    jobs = []
    for p, (history, question, system) in enumerate(read_prompts(prompts, schema)):
        for k in range(samples_per_prompt):
            attrs = {n: rng.randint(schema[n].min, schema[n].max) for n in names}
            jobs.append((f"{p}-{k}", history, question, system, attrs))
    print(f"sampling {len(jobs)} responses ({samples_per_prompt} per prompt, varying {', '.join(names)})")
    answers = generate(
        gen, [j[2] for j in jobs], [j[4] for j in jobs], max_new_tokens, temperature, sft.seed,
        system=[j[3] for j in jobs], histories=[j[1] for j in jobs], batch_size=batch_size,
    )
    kept = [(j, a) for j, a in zip(jobs, answers) if a.strip()]
    if not kept:
        raise ValueError("every sampled response was empty; train the SFT model longer or raise --max-new-tokens")
    rm = load_reward_model(reward_model)
    if rm.spec.schema != schema:
        raise ValueError(f"reward model attributes {rm.spec.schema.names} differ from the SFT model's {schema.names}")
    convs = [j[1] + [Turn(j[2], a, "")] for j, a in kept]
    scores = rm.score(convs, [j[3] for j, _ in kept], batch_size=batch_size)
    labelled = [
        Conversation(j[0], tuple(c[:-1]) + (Turn(c[-1].question, c[-1].answer, rm.labels(s)),), j[3])
        for (j, _), c, s in zip(kept, convs, scores)
    ]
    data = out / "bootstrap.jsonl"
    write_jsonl(data, labelled)
    write_atomic(out / "bootstrap_attributes.jsonl",
                 "".join(json.dumps({"id": j[0], "sampled_with": j[4]}) + "\n" for j, _ in kept))
    print(f"wrote {len(labelled)} re-labelled conversations to {data} ({len(jobs) - len(kept)} empty responses dropped)")
    return train(replace(sft, data=str(data)))
