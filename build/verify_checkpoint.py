"""Check a converted checkpoint (TensorRT-LLM or LLM API/FP8) against its Hugging Face model, without TensorRT-LLM.

The logic lives in steerlm.convert.verify; run `python build/verify_checkpoint.py --help` for the flags.
"""

from steerlm.convert.verify import main

if __name__ == "__main__":
    main()
