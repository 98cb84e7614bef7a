"""`steer_train sft` output served unchanged by a real tritonserver, beside a `steer_train rm` reward model."""

from __future__ import annotations

import numpy as np
import pytest

from steerlm.schema import STEERLM_13B
from steerlm.serve import TritonServer
from steerlm.spec import load_spec
from steerlm.template import Turn
from steerlm_client import SteerClient

QUESTION = "question 3"
ATTRIBUTES = {"creativity": 8}


@pytest.fixture(scope="module")
def server(sft_model, reward_model):
    """One real tritonserver serving the SFT output as `steerlm` and the reward model as `reward_model`,
    both straight from the directories the training CLI wrote."""
    with TritonServer(sft_model, reward_model_dir=reward_model) as srv:
        yield srv


def test_streamed_answer_equals_the_whole_greedy_answer(server):
    client = SteerClient(server.grpc_url)
    whole = client.generate(QUESTION, attributes=ATTRIBUTES, max_tokens=16)
    pieces = list(client.stream(QUESTION, attributes=ATTRIBUTES, max_tokens=16))
    assert whole and len(pieces) > 1
    assert "".join(pieces) == whole


def test_served_answer_is_the_local_greedy_answer_of_the_checkpoint(server, sft_model):
    """Same weights, tokenizer, template and stop string on both sides: the checkpoint needed no conversion."""
    from steer_train.sample import generate

    local = generate(sft_model, [QUESTION], ATTRIBUTES, max_new_tokens=16, temperature=0)[0]
    assert SteerClient(server.http_url, "http").generate(QUESTION, attributes=ATTRIBUTES, max_tokens=16) == local


def test_server_renders_the_prompt_with_the_checkpoints_own_schema(server, sft_model):
    spec = load_spec(sft_model)
    assert spec.schema == STEERLM_13B  # carried from the base through sft
    history = [{"question": "Hi!", "answer": "Hello.", "attributes": {"humor": 7}}]
    served = SteerClient(server.grpc_url).complete(QUESTION, attributes=ATTRIBUTES, system="Be brief.",
                                                   history=history, max_tokens=2).prompt
    assert served == spec.template.render(spec.prompt_turns(QUESTION, ATTRIBUTES, history), "Be brief.")


def test_served_reward_scores_match_the_local_scorer(server, reward_model):
    """Score the generator's own answer through `reward_model` and locally with steerlm.reward.

    The reward model carries the HelpSteer attributes, the generator the 13B ones: each keeps its own."""
    from steerlm.reward import load_reward_model

    client = SteerClient(server.grpc_url)
    answer = client.generate(QUESTION, attributes=ATTRIBUTES, max_tokens=16)
    conversation = [{"question": "Hi!", "answer": "Hello."}, {"question": QUESTION, "answer": answer}]
    served = client.score(conversation, system="Be brief.")
    scorer = load_reward_model(reward_model)
    local = scorer.score([[Turn(t["question"], t["answer"]) for t in conversation]], system="Be brief.")[0]
    assert list(served["scores"]) == scorer.spec.schema.names
    np.testing.assert_allclose(list(served["scores"].values()), local, rtol=1e-4, atol=1e-5)
    assert served["labels"] == scorer.labels(local)
