"""NeMo-Aligner interoperability of the reward model: one prompt convention, two server contracts.

Upstream facts pinned here (NVIDIA/NeMo-Aligner, commit af2b3bd9):
- examples/nlp/gpt/serve_reward_model.py + nemo_aligner/algorithms/reward_server.py: PyTriton model
  `reward_model` with batching, input `sentences` (bytes), output `rewards`; tokenized with add_BOS=False,
  add_EOS=False.
- examples/nlp/data/steerlm/attribute_annotate.py: sends each rated prefix as
  `<extra_id_0>System\\n{s}\\n` + `<extra_id_1>User\\n{q}\\n<extra_id_1>Assistant\\n{a}\\n`... + `<extra_id_2>`
  through pytriton's FuturesModelClient.infer_batch, one [1, 1] row per request, and reads `rewards` and
  `exceeded` (the output whose removal broke it, NVIDIA/NeMo-Aligner #349).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerlm.reward import load_reward_model, nemo_rm_text, pad_batch, parse_attribute_weights, parse_nemo_rm_text
from steerlm.serve import TritonServer
from steerlm.spec import load_spec
from steerlm.template import Turn
from steerlm_client import SteerClient
from tests.checkpoints import random_reward_model
from tests.train.traindata import write_conversations

TURNS = [Turn("Where did techno originate?", "In Detroit, in the 1980s."), Turn("Who started it?", "The Belleville Three.")]
SYSTEM = "Be brief."
WEIGHTS = "helpfulness=0.65,correctness=0.8,coherence=0.45,complexity=0.55,verbosity=-0.4"


@pytest.fixture(scope="module")
def weighted_rm(tiny_model, tmp_path_factory):
    """A reward checkpoint (tiny backbone, random head) with attribute weights, as `rm --attribute-weights` writes."""
    weights = parse_attribute_weights(WEIGHTS, load_spec(tiny_model).schema)
    extra = {"pooling": "last", "max_length": 48, "attribute_weights": weights}
    return random_reward_model(tiny_model, tmp_path_factory.mktemp("rm") / "reward", extra)


@pytest.fixture(scope="module")
def rm_server(weighted_rm):
    with TritonServer(reward_model_dir=weighted_rm) as srv:
        yield srv


def test_nemo_text_round_trips_and_tokenizes_like_the_conversation(weighted_rm):
    scorer = load_reward_model(weighted_rm)
    text = nemo_rm_text(scorer.spec.template, TURNS, SYSTEM)
    assert text.endswith("\n<extra_id_1>Assistant\nThe Belleville Three.\n<extra_id_2>")
    system, turns = parse_nemo_rm_text(scorer.spec.template, text)
    assert (system, turns) == (SYSTEM, [Turn(t.question, t.answer, "") for t in TURNS])
    ids = scorer.encode(TURNS, SYSTEM)
    bos, eos = scorer.tokenizer.token_to_id("<s>"), scorer.tokenizer.token_to_id("</s>")
    assert ids[0] != bos and ids[-1] != eos and bos not in ids and eos not in ids
    with pytest.raises(ValueError, match="must look like"):
        parse_nemo_rm_text(scorer.spec.template, "<extra_id_1>User\nq\n<extra_id_2>")


def test_training_local_and_both_served_contracts_score_the_same(weighted_rm, rm_server, tmp_path):
    """Training's encoding (rm.samples -> scorer.encode -> pad_batch -> forward), the local scorer, the
    `conversation` contract and the `sentences` contract (sent exactly as attribute_annotate.py does) agree."""
    from pytriton.client import FuturesModelClient

    from steer_train.data import load_jsonl
    from steer_train.rm import samples

    scorer = load_reward_model(weighted_rm)
    rows = [(t.question, t.answer, "helpfulness:3") for t in TURNS]
    data = write_conversations(tmp_path / "one.jsonl", rows[:1], system=SYSTEM)
    (turns, system, _), = samples(load_jsonl(data, scorer.spec.schema), scorer.spec)
    ids, mask = pad_batch([scorer.encode(turns, system)], scorer.pad_id)
    with torch.no_grad():
        training = scorer.model(ids, mask).numpy()[0]
    local_one = scorer.score([TURNS[:1]], system=SYSTEM)[0]
    np.testing.assert_allclose(training, local_one, rtol=0, atol=1e-6)

    local = scorer.score([TURNS], system=SYSTEM)[0]
    served = SteerClient(rm_server.http_url, "http").score([(t.question, t.answer) for t in TURNS], system=SYSTEM)
    np.testing.assert_allclose(list(served["scores"].values()), local, rtol=1e-5, atol=1e-5)
    weights = parse_attribute_weights(WEIGHTS, scorer.spec.schema)
    expected_reward = sum(weights.get(n, 0.0) * v for n, v in zip(scorer.spec.schema.names, local))
    assert served["reward"] == pytest.approx(expected_reward, abs=1e-4)

    sentence = nemo_rm_text(scorer.spec.template, TURNS, SYSTEM)
    batch = np.char.encode(np.array([sentence])[..., np.newaxis], "utf-8")
    with FuturesModelClient(rm_server.http_url.split("://")[-1], "reward_model") as client:
        result = client.infer_batch(sentences=batch).result()
    np.testing.assert_allclose(result["rewards"].reshape(-1), local, rtol=1e-5, atol=1e-5)
    assert result["exceeded"].tolist() == [[len(scorer.encode_full(TURNS, SYSTEM)) > 48]] == [[True]]
    assert result["reward"].reshape(-1)[0] == pytest.approx(expected_reward, abs=1e-4)


def test_annotate_labels_the_same_through_either_contract(weighted_rm, rm_server, tmp_path):
    from steer_train.annotate import TritonScorer, annotate

    scorer = load_reward_model(weighted_rm)
    data = write_conversations(tmp_path / "in.jsonl", [(f"q{i}", f"answer number {i}", "") for i in range(6)])
    outputs = {}
    for contract in ("steerlm", "nemo"):
        remote = TritonScorer(rm_server.http_url, 4, contract=contract, template=scorer.spec.template)
        out = tmp_path / f"{contract}.jsonl"
        annotate(data, out, remote, scorer.spec.schema, batch_size=3, progress=False)
        outputs[contract] = out.read_text()
    local = tmp_path / "local.jsonl"
    annotate(data, local, scorer, scorer.spec.schema, batch_size=3, progress=False)
    assert outputs["steerlm"] == outputs["nemo"] == local.read_text()


def test_request_with_both_or_neither_input_is_rejected(rm_server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(rm_server.http_url.split("://")[-1])
    inputs = []
    for name in ("conversation", "sentences"):
        inp = httpclient.InferInput(name, [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"x"]], dtype=object))
        inputs.append(inp)
    with pytest.raises(InferenceServerException, match="exactly one of `conversation`"):
        client.infer("reward_model", inputs)
    bad = httpclient.InferInput("sentences", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"no template here"]], dtype=object))
    with pytest.raises(InferenceServerException, match="sentence must look like"):
        client.infer("reward_model", [bad])
