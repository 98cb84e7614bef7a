"""Hugging Face Llama -> TensorRT-LLM checkpoint (config.json + rank{N}.safetensors), the legacy engine path's input.

The logic lives in steerlm.convert.legacy; run `python build/convert_checkpoint.py --help` for the flags.
"""

import os

# Idle OpenMP workers sleep instead of spinning (read when torch loads; an explicit setting wins): on cores that
# other jobs share, spinning workers made FP8 quantization 4x slower (python -m bench.convert_memory).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from steerlm.convert.legacy import main  # noqa: E402

if __name__ == "__main__":
    main()
