"""Memory plan of a deployment, from config.json alone: does this model fit these GPUs at this TP?

Per GPU (tensor parallelism shards every matrix, replicates the norms):
- weights  = sharded params / TP x bytes + replicated params x bytes; with FP8 the linear layers take
  1 byte and embeddings, norms and lm_head stay 16-bit (the per-tensor scales, a few bytes a layer, are
  left out);
- KV cache = 2 (K and V) x layers x KV heads per GPU x head_dim x bytes, per token; KV heads per GPU
  is max(KV heads / TP, 1) since fewer KV heads than ranks are duplicated;
- allowance = a fixed runtime reserve (CUDA context, cuBLAS and NCCL workspaces) plus the activations
  of one forward step over max_num_tokens tokens and the float32 logits of max_batch_size rows.
What is left after weights and allowance, times the KV-cache memory fraction the LLM API is given,
is the KV-cache budget; the largest batch is that budget over the KV bytes of one max_seq_len sequence.
The numbers are an estimate made before any work: the LLM API measures free memory itself at load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from steerlm.convert.trtllm_ckpt import FormatError, LlamaDims, check_tp, kv_heads_per_rank

GIB = 1024**3
MIB = 1024**2
# CUDA context + cuBLAS workspace + NCCL buffers, measured as roughly 1 GiB per GPU on Hopper/Ampere.
RUNTIME_RESERVE = 1 * GIB


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes, as nvidia-smi reports memory.total
    fp8: bool
    # LLM API defaults for this GPU: the share of free memory the KV cache may take, the batch cap.
    kv_fraction: float
    max_batch_size: int


GPUS: dict[str, Gpu] = {
    "a100-40": Gpu("A100 40GB (SM80)", 40960 * MIB, False, 0.85, 32),
    "a100-80": Gpu("A100 80GB (SM80)", 81920 * MIB, False, 0.90, 64),
    "h100": Gpu("H100 80GB (SM90)", 81559 * MIB, True, 0.90, 64),
    "h200": Gpu("H200 141GB (SM90)", 143771 * MIB, True, 0.90, 128),
}
DTYPES = ("bfloat16", "float16", "fp8")


def gpu(name: str) -> Gpu:
    try:
        return GPUS[name]
    except KeyError:
        raise FormatError(f"GPU={name!r}: choose one of {', '.join(GPUS)}") from None


def check_fp8(gpu_name: str, dtype: str) -> None:
    """FP8 needs SM89/SM90 tensor cores; refuse it on A100 with the reason."""
    if dtype == "fp8" and not gpu(gpu_name).fp8:
        raise FormatError(
            f"DTYPE=fp8 is not possible on {gpu_name}: FP8 needs SM89/SM90 (L40S, H100, H200) and A100 is SM80. "
            "Use DTYPE=bfloat16 or DTYPE=float16 on A100, or GPU=h100/h200 for FP8."
        )


@dataclass(frozen=True)
class MemoryPlan:
    gpu: str
    gpu_bytes: int
    tp_size: int
    dtype: str
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int  # max_batch_size x max_seq_len tokens
    allowance_bytes: int
    kv_budget_bytes: int
    largest_batch: int

    @property
    def fits(self) -> bool:
        return self.largest_batch >= self.max_batch_size

    def to_json(self) -> dict:
        return {**asdict(self), "fits": self.fits}

    def render(self) -> str:
        g = GPUS[self.gpu]
        lines = [
            f"memory plan: {self.tp_size} x {g.name}, {self.dtype}, batch {self.max_batch_size} x "
            f"{self.max_seq_len} tokens (max_num_tokens {self.max_num_tokens}); per GPU:",
            f"  GPU memory          {_gib(self.gpu_bytes)}",
            f"  weights             {_gib(self.weight_bytes)}  ({self.weight_bytes:,} bytes)",
            f"  KV cache per token  {self.kv_bytes_per_token:,} bytes",
            f"  KV cache for batch  {_gib(self.kv_bytes)}  ({self.max_batch_size} x {self.max_seq_len} tokens)",
            f"  activation/workspace allowance {_gib(self.allowance_bytes)}",
            f"  KV budget           {_gib(self.kv_budget_bytes)}  ({g.kv_fraction:g} of what weights and allowance leave)",
            f"  largest batch that fits at {self.max_seq_len} tokens: {self.largest_batch}",
            f"  verdict: {'fits' if self.fits else 'does NOT fit'}",
        ]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def param_counts(dims: LlamaDims) -> tuple[int, int, int]:
    """(linear-layer params, embedding + lm_head params, norm params) of a Llama."""
    h, d = dims.hidden_size, dims.head_size
    attn = h * dims.num_heads * d * 2 + h * dims.num_kv_heads * d * 2  # q, o; k, v
    mlp = 3 * h * dims.intermediate_size
    linear = dims.num_layers * (attn + mlp)
    embed = dims.vocab_size * h * (1 if dims.tie_word_embeddings else 2)
    norms = (2 * dims.num_layers + 1) * h
    return linear, embed, norms


def plan(config: Mapping, tp_size: int, dtype: str, gpu_name: str, max_batch_size: int, max_seq_len: int,
         max_num_tokens: int) -> MemoryPlan:
    """The memory plan of `config` (a Hugging Face Llama config.json) on `tp_size` GPUs of kind `gpu_name`."""
    if dtype not in DTYPES:
        raise FormatError(f"DTYPE={dtype!r}: choose one of {', '.join(DTYPES)}")
    g = gpu(gpu_name)
    dims = LlamaDims.from_hf_config(config)
    check_tp(dims, tp_size)
    if max_batch_size < 1 or max_seq_len < 1 or max_num_tokens < 1:
        raise FormatError("max_batch_size, max_seq_len and max_num_tokens must be >= 1")
    linear, embed, norms = param_counts(dims)
    wide = 2  # bf16/fp16 bytes; FP8 keeps embeddings, norms, lm_head and activations 16-bit
    linear_bytes = 1 if dtype == "fp8" else wide
    weight_bytes = -(-(linear * linear_bytes + embed * wide) // tp_size) + norms * wide
    kv_bytes_per_token = 2 * dims.num_layers * kv_heads_per_rank(dims.num_kv_heads, tp_size) * dims.head_size * (
        1 if dtype == "fp8" else wide)
    kv_bytes = kv_bytes_per_token * max_batch_size * max_seq_len
    # One forward step over max_num_tokens: residual + normed hidden, local q/k/v, local gate and up.
    qkv_local = (dims.num_heads // tp_size + 2 * kv_heads_per_rank(dims.num_kv_heads, tp_size)) * dims.head_size
    act_per_token = 2 * dims.hidden_size + qkv_local + 2 * dims.intermediate_size // tp_size
    allowance = RUNTIME_RESERVE + max_num_tokens * act_per_token * wide + max_batch_size * dims.vocab_size * 4
    free = g.memory - weight_bytes - allowance
    kv_budget = max(int(free * g.kv_fraction), 0)
    largest = kv_budget // (kv_bytes_per_token * max_seq_len)
    return MemoryPlan(gpu_name, g.memory, tp_size, dtype, max_batch_size, max_seq_len, max_num_tokens, weight_bytes,
                      kv_bytes_per_token, kv_bytes, allowance, kv_budget, int(largest))


def allowed_tp_sizes(config: Mapping, limit: int = 64) -> list[int]:
    dims = LlamaDims.from_hf_config(config)
    out = []
    for tp in range(1, limit + 1):
        try:
            check_tp(dims, tp)
        except FormatError:
            continue
        out.append(tp)
    return out


def smallest_fitting_tp(config: Mapping, dtype: str, gpu_name: str, max_batch_size: int, max_seq_len: int,
                        max_num_tokens: int) -> int | None:
    for tp in allowed_tp_sizes(config):
        if plan(config, tp, dtype, gpu_name, max_batch_size, max_seq_len, max_num_tokens).fits:
            return tp
    return None


def refusal(p: MemoryPlan, config: Mapping) -> str:
    """Why `p` does not fit, with its numbers and the smallest TP that does."""
    need = p.weight_bytes + p.allowance_bytes + p.kv_bytes
    tp = smallest_fitting_tp(config, p.dtype, p.gpu, p.max_batch_size, p.max_seq_len, p.max_num_tokens)
    hint = (f"the smallest TP that fits is TP={tp}" if tp else
            f"no TP size of this model fits batch {p.max_batch_size} on {p.gpu}; lower MAX_BATCH or the sequence length")
    return (
        f"TP={p.tp_size} on {p.gpu} does not fit: per GPU weights {p.weight_bytes / GIB:.2f} GiB + allowance "
        f"{p.allowance_bytes / GIB:.2f} GiB + KV cache {p.kv_bytes / GIB:.2f} GiB for {p.max_batch_size} x "
        f"{p.max_seq_len} tokens = {need / GIB:.2f} GiB, with {p.gpu_bytes / GIB:.2f} GiB per GPU and a KV budget of "
        f"{p.kv_budget_bytes / GIB:.2f} GiB (largest batch {p.largest_batch}); {hint}."
    )
