"""Rendering the model repository for either backend, and the `python -m steerlm.serve` command lines."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from steerlm.serve import RenderError, render_repository

# tensorrtllm_backend all_models/inflight_batcher_llm/ensemble/config.pbtxt (commit c2e65b88d852): the inputs
# this package takes from upstream's ensemble, with upstream's types.
UPSTREAM_INPUTS = {
    "text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "num_return_sequences": "TYPE_INT32",
    "bad_words": "TYPE_STRING", "stop_words": "TYPE_STRING", "exclude_input_in_output": "TYPE_BOOL",
    "end_id": "TYPE_INT32", "pad_id": "TYPE_INT32", "top_k": "TYPE_INT32", "top_p": "TYPE_FP32",
    "temperature": "TYPE_FP32", "repetition_penalty": "TYPE_FP32", "min_tokens": "TYPE_INT32",
    "presence_penalty": "TYPE_FP32", "frequency_penalty": "TYPE_FP32", "seed": "TYPE_UINT64",
    "beam_width": "TYPE_INT32", "stream": "TYPE_BOOL",
}
# perf_analyzer genai-perf/genai_perf/inputs/converters/tensorrtllm_converter.py (commit ceccbfa04026) sends
# min_length with --output-tokens-mean-deterministic.
STEERLM_INPUTS = {"min_length": "TYPE_INT32", "attributes": "TYPE_STRING", "system": "TYPE_STRING", "history": "TYPE_STRING",
                  "return_num_input_tokens": "TYPE_BOOL", "return_num_output_tokens": "TYPE_BOOL"}


def config(repo, model) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def params(cfg):
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.fixture
def engine_dir(tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"pretrained_config": {"mapping": {"world_size": 2}}}))
    return engine


@pytest.mark.parametrize("backend, device, engine, options", [
    ("cpu", None, "torch", {"device": "cpu"}),
    ("torch", "cuda", "torch", {"device": "cuda"}),
    ("trtllm", None, "trtllm", {}),
])
def test_every_backend_renders_the_same_models_and_only_chooses_the_engine(tmp_path, tiny_model, engine_dir,
                                                                          backend, device, engine, options):
    repo = render_repository(tmp_path / backend, tiny_model, backend=backend, device=device,
                             engine_dir=engine_dir if backend == "trtllm" else None)
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["ensemble", "generator", "generator_whole",
                                                                    "preprocessing", "steerlm", "steerlm_whole"]
    generator = config(repo, "generator")
    assert generator.backend == "python" and generator.model_transaction_policy.decoupled
    p = params(generator)
    assert p["generation_engine"] == engine and json.loads(p["engine_options"]) == options
    assert p["model_dir"] == str(tiny_model.resolve())
    assert p["engine_dir"] == (str(engine_dir.resolve()) if backend == "trtllm" else "")
    assert not config(repo, "preprocessing").model_transaction_policy.decoupled
    assert config(repo, "preprocessing").instance_group[0].count >= 2  # a large request never blocks the rest
    cpu = render_repository(tmp_path / "reference", tiny_model)
    for name in ("steerlm", "ensemble", "preprocessing"):
        ours, reference = config(repo, name), config(cpu, name)
        for cfg in (ours, reference):
            cfg.parameters.pop("ipc_socket", None)  # each repository has its own socket
        assert ours == reference


def test_the_streaming_model_takes_upstreams_inputs_under_both_names(tmp_path, tiny_model):
    repo = render_repository(tmp_path / "repo", tiny_model)
    for name in ("steerlm", "ensemble"):
        model = config(repo, name)
        assert model.name == name
        assert {t.name: mc.DataType.Name(t.data_type) for t in model.input} == UPSTREAM_INPUTS | STEERLM_INPUTS
        assert [t.name for t in model.input if not t.optional] == ["text_input", "max_tokens"]
        assert {t.name for t in model.output} == {"text_output", "prompt", "finish_reason", "num_input_tokens",
                                                   "num_output_tokens"}
    assert [t.name for t in config(repo, "preprocessing").input] == [t.name for t in config(repo, "steerlm").input]


def test_the_streaming_model_is_the_decoupled_relay_triton_reports_cancels_to(tmp_path, tiny_model):
    """Triton cancels the request it received; only a model it calls directly hears of it (docs/serving.md
    "Cancellation"). So `steerlm` is a decoupled python model on the generator's socket, not an ensemble, with
    several instances (one large request being tokenized never blocks the rest) and the same limits."""
    repo = render_repository(tmp_path / "repo", tiny_model, max_input_bytes=1234)
    relay = config(repo, "steerlm")
    assert relay.backend == "python" and relay.model_transaction_policy.decoupled and not relay.platform
    assert relay.instance_group[0].count >= 2
    assert params(relay)["ipc_socket"] == params(config(repo, "generator"))["ipc_socket"]
    assert params(relay)["max_input_bytes"] == params(config(repo, "preprocessing"))["max_input_bytes"] == "1234"
    assert (repo / "steerlm" / "1" / "model.py").is_file() and (repo / "ensemble" / "1" / "model.py").is_file()


def test_the_whole_answer_ensemble_ends_in_a_non_decoupled_model_on_the_generators_socket(tmp_path, tiny_model):
    repo = render_repository(tmp_path / "repo", tiny_model)
    whole, stream = config(repo, "steerlm_whole"), config(repo, "steerlm")
    assert whole.input == stream.input and whole.output == stream.output
    assert [s.model_name for s in whole.ensemble_scheduling.step] == ["preprocessing", "generator_whole"]
    forwarder = config(repo, "generator_whole")
    assert not forwarder.model_transaction_policy.decoupled and forwarder.HasField("dynamic_batching")
    socket = params(config(repo, "generator"))["ipc_socket"]
    assert params(forwarder)["ipc_socket"] == socket == str(repo / ".run" / "generator.sock")


def test_the_nemo_model_is_rendered_under_the_name_given_and_a_clashing_name_is_refused(tmp_path, tiny_model):
    repo = render_repository(tmp_path / "repo", tiny_model, nemo_model_name="Llama2-70B-SteerLM-Chat")
    nemo = config(repo, "Llama2-70B-SteerLM-Chat")
    assert nemo.name == "Llama2-70B-SteerLM-Chat" and [t.name for t in nemo.output] == ["outputs"]
    assert [t.name for t in nemo.input if not t.optional] == ["prompts"]
    for name in ("steerlm", "generator", "a/b"):
        with pytest.raises(RenderError, match="triton-model-name"):
            render_repository(tmp_path / "bad", tiny_model, nemo_model_name=name)


def test_the_shared_secret_is_in_the_repository_but_in_no_model(tmp_path, tiny_model):
    repo = render_repository(tmp_path / "repo", tiny_model)
    key = repo / ".steerlm-key"
    assert key.is_file() and oct(key.stat().st_mode & 0o777) == "0o600" and len(key.read_text()) == 64
    assert key.read_text() != render_repository(tmp_path / "other", tiny_model).joinpath(".steerlm-key").read_text()
    assert not any(key.read_text() in f.read_text() for f in repo.rglob("config.pbtxt"))


@pytest.mark.parametrize("problem", ["reward_as_generator", "unknown_backend", "occupied_dir", "bad_spec",
                                     "cpu_on_cuda"])
def test_render_refuses_what_cannot_work(tmp_path, tiny_model, problem):
    from steerlm.spec import SteerSpec, load_spec, save_spec

    kwargs = dict(model_dir=tiny_model)
    if problem in ("reward_as_generator", "bad_spec"):
        copy = tmp_path / "copy"
        shutil.copytree(tiny_model, copy)
        kwargs["model_dir"] = copy
        if problem == "bad_spec":
            (copy / "steerlm.json").write_text("{not json")
            match = re.escape(str(copy.resolve() / "steerlm.json"))
        else:
            spec = load_spec(copy)
            save_spec(copy, SteerSpec(spec.schema, spec.template, "reward_model", {"pooling": "last"}))
            match = "not a SteerLM generator"
    elif problem == "unknown_backend":
        kwargs["backend"], match = "vllm", "cpu, torch, trtllm"
    elif problem == "cpu_on_cuda":
        kwargs["device"], match = "cuda", "use backend torch"
    else:
        (tmp_path / "repo").mkdir()
        (tmp_path / "repo" / "notes.txt").write_text("mine")
        match = "not a rendered SteerLM repository"
    with pytest.raises(RenderError, match=match):
        render_repository(tmp_path / "repo", **kwargs)
    if problem == "occupied_dir":
        assert (tmp_path / "repo" / "notes.txt").read_text() == "mine"
