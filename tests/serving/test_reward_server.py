"""The `reward_model` Triton model: scores a conversation exactly as the local scorer does."""

from __future__ import annotations

import numpy as np
import pytest

from steerlm.serve import TritonServer
from steerlm_client import SteerClient, SteerError
from tests.checkpoints import random_reward_model

CONVERSATION = [{"question": "Where did techno originate?", "answer": "In Detroit, in the 1980s."},
                {"question": "Who started it?", "answer": "The Belleville Three."}]


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory):
    """A reward checkpoint in the contract format: tiny random backbone + a random linear head."""
    return random_reward_model(tiny_model, tmp_path_factory.mktemp("rm") / "reward", {"pooling": "last"})


@pytest.fixture(scope="module")
def reward_server(reward_model):
    with TritonServer(reward_model_dir=reward_model) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_scores_equal_the_local_scorer(reward_server, reward_model, protocol):
    from steerlm.reward import load_reward_model
    from steerlm.template import Turn

    url = reward_server.grpc_url if protocol == "grpc" else reward_server.http_url
    result = SteerClient(url, protocol).score(CONVERSATION, system="Be brief.")
    scorer = load_reward_model(reward_model)
    local = scorer.score([[Turn(t["question"], t["answer"]) for t in CONVERSATION]], system="Be brief.")[0]
    assert list(result["scores"]) == scorer.spec.schema.names
    np.testing.assert_allclose(list(result["scores"].values()), local, rtol=1e-4, atol=1e-5)
    assert result["labels"] == scorer.labels(local)


def test_malformed_conversation_is_rejected_clearly(reward_server):
    client = SteerClient(reward_server.grpc_url)
    with pytest.raises(SteerError, match=r"turns\[0\] must have string fields question and answer"):
        client.score([{"question": "q", "answer": 3}])
    assert client.score(CONVERSATION)["labels"]
