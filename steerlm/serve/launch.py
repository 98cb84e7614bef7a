"""Command line for NVIDIA's tritonserver serving the repository with the TensorRT-LLM LLM API generator
(docs/serving-gpu.md)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

DEFAULT_TRITONSERVER = "/opt/tritonserver/bin/tritonserver"


def default_tritonserver() -> str:
    if Path(DEFAULT_TRITONSERVER).is_file():
        return DEFAULT_TRITONSERVER
    return shutil.which("tritonserver") or DEFAULT_TRITONSERVER


def engine_world_size(engine_dir: str | os.PathLike) -> int | None:
    """world_size recorded in a TensorRT-LLM engine (or checkpoint) config.json, if there is one."""
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    mapping = config.get("pretrained_config", config).get("mapping") or {}
    size = mapping.get("world_size")
    return int(size) if size is not None else None


def trtllm_command(repo_dir: str | os.PathLike, http_port: int, grpc_port: int, metrics_port: int,
                   address: str = "127.0.0.1", tritonserver: str | None = None) -> list[str]:
    """One tritonserver, whatever the tensor-parallel size: the generator's LLM API engine starts its own MPI
    workers for the other ranks (as upstream's Triton `llmapi` model does), so there is no mpirun here."""
    return [
        tritonserver or default_tritonserver(),
        f"--model-repository={repo_dir}",
        f"--http-address={address}", f"--http-port={http_port}",
        f"--grpc-address={address}", f"--grpc-port={grpc_port}",
        f"--metrics-address={address}", f"--metrics-port={metrics_port}",
        "--disable-auto-complete-config",
    ]
