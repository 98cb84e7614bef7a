"""`make engine`: memory plan, then the LLM API directory (default) or the legacy TensorRT-LLM engine.

The logic lives in steerlm.convert.engine; run `python build/build_engine.py --help` for the flags.
"""

import os

# Idle OpenMP workers sleep instead of spinning (read when torch loads; an explicit setting wins): on cores that
# other jobs share, spinning workers made FP8 quantization 4x slower (python -m bench.convert_memory).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from steerlm.convert.engine import main  # noqa: E402

if __name__ == "__main__":
    main()
