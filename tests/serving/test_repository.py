"""Rendering the model repository for either backend, and the `python -m steerlm.serve` command lines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from steerlm.serve import RenderError, render_repository

# The tensors the C++ backend reads and writes, name: (dtype, dims) (NVIDIA/TensorRT-LLM
# triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt).
GENERATOR_INPUTS = {
    "input_ids": ("TYPE_INT32", [-1]), "input_lengths": ("TYPE_INT32", [1]),
    "request_output_len": ("TYPE_INT32", [1]), "end_id": ("TYPE_INT32", [1]), "pad_id": ("TYPE_INT32", [1]),
    "stop_words_list": ("TYPE_INT32", [2, -1]), "bad_words_list": ("TYPE_INT32", [2, -1]),
    "streaming": ("TYPE_BOOL", [1]), "temperature": ("TYPE_FP32", [1]), "runtime_top_k": ("TYPE_INT32", [1]),
    "runtime_top_p": ("TYPE_FP32", [1]), "seed": ("TYPE_UINT64", [1]),
}
GENERATOR_OUTPUTS = {"output_ids": ("TYPE_INT32", [-1, -1]), "sequence_length": ("TYPE_INT32", [-1])}
# tensorrtllm_backend's user-facing ensemble names, plus the SteerLM additions.
ENSEMBLE_INPUTS = {
    "text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "stop_words": "TYPE_STRING", "bad_words": "TYPE_STRING",
    "stream": "TYPE_BOOL", "temperature": "TYPE_FP32", "top_k": "TYPE_INT32", "top_p": "TYPE_FP32",
    "seed": "TYPE_UINT64", "end_id": "TYPE_INT32", "pad_id": "TYPE_INT32",
    "attributes": "TYPE_STRING", "system": "TYPE_STRING", "history": "TYPE_STRING",
}


def config(repo, model) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def tensors(items):
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in items}


def params(cfg):
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.fixture
def engine_dir(tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"pretrained_config": {"mapping": {"world_size": 2}}}))
    return engine


def test_trtllm_rendering_points_the_cpp_backend_at_the_engine(tmp_path, tiny_model, engine_dir):
    repo = render_repository(tmp_path / "repo", tiny_model, backend="trtllm", engine_dir=engine_dir)
    cfg = config(repo, "tensorrt_llm")
    assert cfg.backend == "tensorrtllm" and cfg.model_transaction_policy.decoupled
    assert {k: v for k, v in tensors(cfg.input).items() if k in GENERATOR_INPUTS} == GENERATOR_INPUTS
    assert tensors(cfg.output) == GENERATOR_OUTPUTS
    p = params(cfg)
    assert p["gpt_model_path"] == str(engine_dir.resolve())
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["exclude_input_in_output"] == "true" and p["enable_kv_cache_reuse"] == "true"
    assert not (repo / "tensorrt_llm" / "1" / "model.py").exists()
    assert params(config(repo, "preprocessing"))["model_dir"] == str(tiny_model.resolve())


def test_both_backends_share_one_generator_contract_and_ensemble(tmp_path, tiny_model, engine_dir):
    cpu = render_repository(tmp_path / "cpu", tiny_model, backend="cpu")
    gpu = render_repository(tmp_path / "gpu", tiny_model, backend="trtllm", engine_dir=engine_dir)
    assert config(cpu, "tensorrt_llm").backend == "python"
    assert params(config(cpu, "tensorrt_llm"))["hf_model_dir"] == str(tiny_model.resolve())
    assert (cpu / "tensorrt_llm" / "1" / "model.py").is_file()
    cpu_gen, gpu_gen = config(cpu, "tensorrt_llm"), config(gpu, "tensorrt_llm")
    assert tensors(cpu_gen.input) == tensors(gpu_gen.input) and tensors(cpu_gen.output) == tensors(gpu_gen.output)
    for name in ("steerlm", "preprocessing", "postprocessing"):
        assert config(cpu, name) == config(gpu, name)
    ensemble = config(cpu, "steerlm")
    assert ensemble.platform == "ensemble"
    assert {t.name: mc.DataType.Name(t.data_type) for t in ensemble.input} == ENSEMBLE_INPUTS
    assert [t.name for t in ensemble.input if not t.optional] == ["text_input", "max_tokens"]
    assert {t.name for t in ensemble.output} == {"text_output", "prompt"}


def test_the_generator_receives_tensorrt_llm_tensor_names(tmp_path, tiny_model):
    """Postprocessing forwards its inputs to `tensorrt_llm` unchanged, so their names are the generator's."""
    repo = render_repository(tmp_path / "repo", tiny_model)
    forwarded = {t.name for t in config(repo, "postprocessing").input} - {"STOP_STRINGS", "PROMPT"}
    assert forwarded <= set(GENERATOR_INPUTS)
    assert {t.name for t in config(repo, "tensorrt_llm").input} >= forwarded


@pytest.mark.parametrize("problem", ["reward_as_generator", "unknown_backend", "occupied_dir", "no_engine"])
def test_render_refuses_what_cannot_work(tmp_path, tiny_model, problem):
    from steerlm.spec import SteerSpec, load_spec, save_spec

    kwargs = dict(model_dir=tiny_model)
    if problem == "reward_as_generator":
        rm = tmp_path / "rm"
        shutil.copytree(tiny_model, rm)
        spec = load_spec(rm)
        save_spec(rm, SteerSpec(spec.schema, spec.template, "reward_model", {"pooling": "last"}))
        kwargs["model_dir"], match = rm, "not a SteerLM generator"
    elif problem == "unknown_backend":
        kwargs["backend"], match = "vllm", "cpu, trtllm"
    elif problem == "occupied_dir":
        (tmp_path / "repo").mkdir()
        (tmp_path / "repo" / "notes.txt").write_text("mine")
        match = "not a rendered SteerLM repository"
    else:
        kwargs["backend"], match = "trtllm", "needs --engine-dir"
    with pytest.raises(RenderError, match=match):
        render_repository(tmp_path / "repo", **kwargs)
    if problem == "occupied_dir":
        assert (tmp_path / "repo" / "notes.txt").read_text() == "mine"


def serve_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerlm.serve", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_dry_run_prints_one_tritonserver_per_rank_under_mpirun(tmp_path, tiny_model, engine_dir):
    out = serve_cli("--model", tiny_model, "--backend", "trtllm", "--engine-dir", engine_dir, "--tp", 2,
                    "--repo-dir", tmp_path / "repo", "--tritonserver", "/opt/tritonserver/bin/tritonserver",
                    "--dry-run")
    assert out.returncode == 0, out.stderr
    line = out.stdout.splitlines()[-1].split()
    assert line[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(line[2:]).split(" : ")
    assert len(ranks) == 2
    repo = f"--model-repository={(tmp_path / 'repo').resolve()}"
    for rank, text in enumerate(ranks):
        words = text.split()
        assert words[:3] == ["-n", "1", "/opt/tritonserver/bin/tritonserver"] and repo in words
        assert f"--backend-config=python,shm-region-prefix-name=prefix{rank}_" in words
        assert "--http-port=8000" in words and "--grpc-port=8001" in words
    assert "--load-model=tensorrt_llm" in ranks[1] and "--model-control-mode=explicit" in ranks[1]
    assert "--load-model" not in ranks[0]
    assert config(tmp_path / "repo", "tensorrt_llm").backend == "tensorrtllm"


def test_tp_must_match_the_engine(tmp_path, tiny_model, engine_dir):
    out = serve_cli("--model", tiny_model, "--backend", "trtllm", "--engine-dir", engine_dir, "--tp", 1, "--dry-run")
    assert out.returncode != 0 and "built for 2 ranks but --tp is 1" in out.stderr
