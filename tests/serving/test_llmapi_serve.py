"""`--backend trtllm`: the repository renders the generator with the LLM API engine, the launcher runs one
tritonserver, and a machine without TensorRT-LLM gets one line saying what to install."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from steerlm.serve import llmapi
from steerlm.serve.engines import ENGINES, create_engine
from steerlm.serve.launch import trtllm_command
from tests.serving import llmapi_facade

no_trtllm = pytest.mark.skipif(llmapi.installed_version() is not None, reason="TensorRT-LLM is installed here")


def serve_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerlm.serve", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _parameters(config: str) -> dict[str, str]:
    return dict(re.findall(r'key: "(\w+)", value: \{ string_value: "((?:[^"\\]|\\.)*)" \}', config))


def test_trtllm_is_a_registered_engine():
    assert ENGINES["trtllm"] == "steerlm.serve.llmapi:llmapi_engine"


@no_trtllm
def test_engine_factory_without_tensorrt_llm_raises_the_install_line(tiny_model):
    with pytest.raises(llmapi.LLMAPIError) as exc:
        create_engine("trtllm", tiny_model, max_batch_size=4)
    assert str(exc.value) == llmapi.INSTALL_HINT


def test_generator_batch_size_applies_only_where_the_options_file_sets_none(tmp_path, tiny_model):
    assert llmapi.engine_options(tiny_model, 8, {}) == {"max_batch_size": 8}
    assert llmapi.engine_options(tiny_model, 8, {"max_batch_size": 32}) == {"max_batch_size": 32}
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / llmapi.OPTIONS_FILE).write_text("max_batch_size: 64\n")
    assert llmapi.engine_options(tmp_path, 8, {"tensor_parallel_size": 2}) == {"tensor_parallel_size": 2}


def test_one_tritonserver_whatever_the_tensor_parallel_size(tmp_path):
    cmd = trtllm_command(tmp_path, 8000, 8001, 8002, tritonserver="/opt/tritonserver/bin/tritonserver")
    assert cmd[0] == "/opt/tritonserver/bin/tritonserver" and "mpirun" not in cmd
    assert f"--model-repository={tmp_path}" in cmd and "--http-address=127.0.0.1" in cmd


def test_dry_run_renders_the_generator_with_the_llmapi_engine(tmp_path, tiny_model):
    out = serve_cli("--model", tiny_model, "--backend", "trtllm", "--tp", 2, "--max-batch-size", 16,
                    "--repo-dir", tmp_path / "repo", "--dry-run")
    assert out.returncode == 0, out.stderr
    config = (tmp_path / "repo" / "generator" / "config.pbtxt").read_text()
    params = _parameters(config)
    assert params["generation_engine"] == "trtllm"
    assert params["model_dir"] == str(tiny_model.resolve())
    assert json.loads(params["engine_options"].replace('\\"', '"')) == {"tensor_parallel_size": 2}
    assert 'backend: "python"' in config and "max_batch_size: 16" in config
    command = out.stdout.split("server command:")[1].split()
    assert command[0].endswith("tritonserver") and "mpirun" not in command
    assert f"--model-repository={(tmp_path / 'repo').resolve()}" in command


def test_engine_dir_is_what_the_generator_loads(tmp_path, tiny_model):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text("{}")
    out = serve_cli("--model", tiny_model, "--backend", "trtllm", "--engine-dir", engine,
                    "--repo-dir", tmp_path / "repo", "--dry-run")
    assert out.returncode == 0, out.stderr
    params = _parameters((tmp_path / "repo" / "generator" / "config.pbtxt").read_text())
    assert params["engine_dir"] == str(engine.resolve()) and params["engine_options"] == "{}"


@no_trtllm
def test_without_tensorrt_llm_serving_stops_with_one_line(tmp_path, tiny_model):
    out = serve_cli("--model", tiny_model, "--backend", "trtllm", "--repo-dir", tmp_path / "repo")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"Error: {llmapi.INSTALL_HINT}"


def test_a_legacy_engine_for_other_ranks_is_refused_before_the_server_starts(tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    (out_dir / "engine").mkdir(parents=True)
    (out_dir / "config.json").write_text("{}")
    (out_dir / llmapi.ENGINE_INFO_FILE).write_text(json.dumps({"format": "legacy-engine", "tp_size": 2}))
    (out_dir / "engine" / "config.json").write_text(json.dumps({"version": "1.2.1",
                                                                 "pretrained_config": {"mapping": {"world_size": 2}}}))
    monkeypatch.setattr(llmapi, "installed_version", lambda: "1.2.1")
    with pytest.raises(llmapi.LLMAPIError, match="built for 2 ranks but tensor_parallel_size is 1"):
        llmapi.preflight(out_dir, {"tensor_parallel_size": 1})
    assert llmapi.preflight(out_dir).options == {"tensor_parallel_size": 2}


def test_cpu_backend_refuses_trtllm_options(tiny_model):
    out = serve_cli("--model", tiny_model, "--tp", 2, "--dry-run")
    assert out.returncode != 0 and "--engine-dir and --tp belong to --backend trtllm" in out.stderr


def test_a_legacy_engine_output_renders_its_template_from_next_to_the_engine(tmp_path, tiny_model):
    # The layout `make engine ENGINE=legacy` writes: the tokenizer and steerlm.json are copied into OUT/engine.
    out_dir = tmp_path / "out"
    (out_dir / "engine").mkdir(parents=True)
    (out_dir / "checkpoint").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "steerlm.json", "generation_config.json"):
        if (tiny_model / name).is_file():
            (out_dir / "engine" / name).write_bytes((tiny_model / name).read_bytes())
    (out_dir / "engine" / "config.json").write_text(json.dumps({"version": "1.2.1"}))
    (out_dir / llmapi.ENGINE_INFO_FILE).write_text(json.dumps({"format": "legacy-engine", "tensorrt_llm": "==1.2.1",
                                                                "tp_size": 1}))
    layout = llmapi.read_layout(out_dir)
    assert layout.model == layout.tokenizer == out_dir / "engine"
    out = serve_cli("--model", out_dir, "--backend", "trtllm", "--repo-dir", tmp_path / "repo", "--dry-run")
    assert out.returncode == 0, out.stderr
    params = _parameters((tmp_path / "repo" / "generator" / "config.pbtxt").read_text())
    assert params["model_dir"] == str((out_dir / "engine").resolve())
    assert params["engine_dir"] == str(out_dir.resolve()) and params["generation_engine"] == "trtllm"


def install_fake_tensorrt_llm(site: Path) -> None:
    """A `tensorrt_llm` whose LLM and SamplingParams are the CPU facade's (llmapi_facade.py), so a rendered trtllm
    repository runs in a real tritonserver here, through the same loader and engine. Its LLM records the keyword
    arguments it was created with in llm_args.json."""
    (site / "tensorrt_llm").mkdir(parents=True)
    # The facade goes inside the fake package: the backend's interpreter has steerlm but not this test tree.
    shutil.copyfile(Path(llmapi_facade.__file__), site / "tensorrt_llm" / "llmapi_facade.py")
    (site / "tensorrt_llm" / "__init__.py").write_text(
        "import json, pathlib\n"
        "from tensorrt_llm import llmapi_facade\n"
        "SamplingParams = llmapi_facade.SamplingParams\n"
        "class LLM(llmapi_facade.LLM):\n"
        "    def __init__(self, **kwargs):\n"
        "        pathlib.Path(__file__).with_name('llm_args.json').write_text(json.dumps(kwargs))\n"
        "        super().__init__(**kwargs)\n")
    (site / "tensorrt_llm-1.3.0.dist-info").mkdir()
    (site / "tensorrt_llm-1.3.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: 1.3.0\n")


def test_rendered_trtllm_repository_serves_through_the_llmapi_engine(tmp_path, tiny_model):
    from steerlm.serve import TritonServer
    from steerlm.serve.repository import render_repository
    from steerlm_client import SteerClient

    repo = render_repository(tmp_path / "repo", tiny_model, backend="trtllm", max_batch_size=4,
                             engine_options={"tensor_parallel_size": 1})
    # The python backend puts a model's version directory on its import path: the generator finds this one there.
    site = repo / "generator" / "1"
    install_fake_tensorrt_llm(site)
    question = "Where and when did techno music originate?"
    with TritonServer(repo_dir=repo, workdir=tmp_path / "run") as server:
        client = SteerClient(server.http_url, "http", timeout=120)
        answer = client.generate(question, max_tokens=12)
        streamed = "".join(client.stream(question, max_tokens=12))
    assert answer and answer == streamed
    args = json.loads((site / "tensorrt_llm" / "llm_args.json").read_text())
    assert args == {"model": str(tiny_model.resolve()), "tokenizer": str(tiny_model.resolve()),
                    "tensor_parallel_size": 1, "max_batch_size": 4}
