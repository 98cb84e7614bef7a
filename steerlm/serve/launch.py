"""Command lines for NVIDIA's tritonserver with the TensorRT-LLM backend (the layout of NVIDIA/TensorRT-LLM
triton_backend/all_models/inflight_batcher_llm).

One tritonserver process per tensor-parallel rank under mpirun; rank 0 serves every model, the other ranks
load only `tensorrt_llm`. Each rank gets its own python backend shared-memory prefix."""

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


def trtllm_command(repo_dir: str | os.PathLike, tp: int, http_port: int, grpc_port: int, metrics_port: int,
                   address: str = "127.0.0.1", tritonserver: str | None = None) -> list[str]:
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    tritonserver = tritonserver or default_tritonserver()
    cmd: list[str] = ["mpirun", "--allow-run-as-root"] if tp > 1 else []
    for rank in range(tp):
        if tp > 1:
            cmd += ["-n", "1"]
        cmd += [
            tritonserver,
            f"--model-repository={repo_dir}",
            f"--http-address={address}", f"--http-port={http_port}",
            f"--grpc-address={address}", f"--grpc-port={grpc_port}",
            f"--metrics-address={address}", f"--metrics-port={metrics_port}",
        ]
        if rank > 0:
            cmd += ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
        cmd += ["--disable-auto-complete-config", f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if tp > 1:
            cmd += [":"]
    return cmd[:-1] if tp > 1 else cmd
