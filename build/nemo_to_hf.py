"""Import a NeMo Megatron GPT/Llama .nemo checkpoint as a Hugging Face Llama checkpoint.

The logic lives in steerlm.convert.nemo; run `python build/nemo_to_hf.py --help` for the flags.
"""

from steerlm.convert.nemo import main

if __name__ == "__main__":
    main()
