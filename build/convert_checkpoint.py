"""Hugging Face Llama -> TensorRT-LLM checkpoint (config.json + rank{N}.safetensors), the legacy engine path's input.

The logic lives in steerlm.convert.legacy; run `python build/convert_checkpoint.py --help` for the flags.
"""

from steerlm.convert.legacy import main

if __name__ == "__main__":
    main()
