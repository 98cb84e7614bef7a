"""What `make engine` leaves next to the checkpoint for the serving side.

`extra_llm_api_options.yaml` holds keyword arguments of TensorRT-LLM's `LLM(...)`, the same file
`trtllm-serve --extra_llm_api_options` takes. Key names are TensorRT-LLM's (tensorrt_llm/llmapi/llm_args.py:
BaseLlmArgs tensor_parallel_size, max_batch_size, max_num_tokens, max_seq_len; KvCacheConfig
free_gpu_memory_fraction, enable_block_reuse, dtype; CudaGraphConfig batch_sizes). Those config classes
forbid unknown keys, so nothing else goes in.

`steerlm_engine.json` records what the directory is and which TensorRT-LLM it needs (CONTRACTS section 2).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from steerlm.convert.plan import GPUS, MemoryPlan
from steerlm.files import write_atomic, write_json
from steerlm.serve.llmapi import ENGINE_INFO_FILE, OPTIONS_FILE  # the reader owns the names

# HF checkpoints (and ModelOpt FP8 ones) load directly through the PyTorch backend from 1.0 on.
LLMAPI_VERSION = ">=1.0"
# The TensorRT engine backend and trtllm-build were removed in 1.3.
LEGACY_VERSION = "<1.3"


def cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to max_batch_size, plus max_batch_size itself: decode batches replay a captured graph."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def llm_api_options(p: MemoryPlan) -> dict:
    return {
        "tensor_parallel_size": p.tp_size,
        "max_batch_size": p.max_batch_size,
        "max_num_tokens": p.max_num_tokens,
        "max_seq_len": p.max_seq_len,
        "kv_cache_config": {
            "free_gpu_memory_fraction": GPUS[p.gpu].kv_fraction,
            # Every SteerLM request starts with the same system prompt: its KV blocks are reused.
            "enable_block_reuse": True,
            "dtype": "fp8" if p.dtype == "fp8" else "auto",
        },
        "cuda_graph_config": {"batch_sizes": cuda_graph_batch_sizes(p.max_batch_size)},
    }


def record(p: MemoryPlan, fmt: str, tensorrt_llm: str) -> dict:
    return {"format": fmt, "tensorrt_llm": tensorrt_llm, "tp_size": p.tp_size, "dtype": p.dtype, "gpu": p.gpu,
            "plan": p.to_json()}


def write_llmapi_files(out: Path, p: MemoryPlan) -> None:
    write_atomic(out / OPTIONS_FILE, yaml.safe_dump(llm_api_options(p), sort_keys=False))
    write_json(out / ENGINE_INFO_FILE, record(p, "llmapi", LLMAPI_VERSION))
