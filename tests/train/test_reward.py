"""`rm`: the attribute-prediction model learns, saves the contract layout and scores through one code path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from steer_train.data import load_jsonl
from steerlm.reward import load_reward_model
from steerlm.spec import load_spec
from steerlm.template import Turn


def test_rm_learns_planted_length_signal_on_held_out_rows(trained_rm):
    report = json.loads((trained_rm / "eval.json").read_text())
    assert set(report) == {"verbosity"}  # only the rated attribute is reported
    assert report["verbosity"]["n"] == 40
    assert report["verbosity"]["pearson"] > 0.8


def test_rm_checkpoint_follows_the_contract(trained_rm):
    spec = load_spec(trained_rm)
    assert spec.kind == "reward_model" and spec.extra["pooling"] == "last"
    head = load_file(str(trained_rm / "reward_head.safetensors"))
    hidden = json.loads((trained_rm / "config.json").read_text())["hidden_size"]
    assert head["weight"].shape == (9, hidden) and head["bias"].shape == (9,)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (trained_rm / name).is_file()


def test_loaded_scorer_reproduces_held_out_metrics(trained_rm, rm_data):
    scorer = load_reward_model(trained_rm)
    convs = load_jsonl(rm_data[1], scorer.spec.schema)
    scores = scorer.score([list(c.turns) for c in convs], [c.system for c in convs], batch_size=7)
    target = [scorer.spec.schema.parse(c.turns[0].labels)["verbosity"] for c in convs]
    v = scorer.spec.schema.names.index("verbosity")
    report = json.loads((trained_rm / "eval.json").read_text())["verbosity"]
    assert scores.shape == (40, 9) and scores.dtype == np.float32
    assert np.corrcoef(scores[:, v], target)[0, 1] == pytest.approx(report["pearson"], abs=1e-4)


def test_scores_do_not_depend_on_batching_or_labels(trained_rm):
    scorer = load_reward_model(trained_rm)
    short = [Turn("q", "la la", "verbosity:4")]
    long = [Turn("q", " ".join(["la"] * 30), "")]
    together = scorer.score([short, long], "", batch_size=2)
    alone = np.concatenate([scorer.score([short], ""), scorer.score([long], "")])
    assert np.allclose(together, alone, atol=1e-5)
    assert scorer.score([[Turn("q", "la la", "")]], "")[0] == pytest.approx(alone[0], abs=1e-6)


def test_encoder_backbone_trains_with_mean_pooling(tmp_path, tiny_model, rm_data):
    """A BERT-style encoder (MiniLM is one) works as the backbone and pools by averaging."""
    import shutil

    from transformers import BertConfig, BertModel

    from steer_train.rm import RMConfig, train

    enc = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(enc)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, enc / name)
    out = train(RMConfig(model=str(enc), data=str(rm_data[0]), out=str(tmp_path / "rm"), max_steps=3,
                         batch_size=8, max_length=128, progress=False))
    scorer = load_reward_model(out)
    assert scorer.spec.extra["pooling"] == "mean"
    assert type(scorer.model.backbone).__name__ == "BertModel"
    assert scorer.score([[Turn("q", "a")]]).shape == (1, 9)


def test_loading_a_generator_as_reward_model_is_refused(tiny_model):
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(tiny_model)
