"""Checkpoint conversion for serving: the library behind the scripts in build/.

- `engine`: `make engine` (build/build_engine.py): memory plan, then the LLM API directory (default)
  or the legacy TensorRT-LLM engine.
- `plan`: per-GPU memory plan from config.json alone.
- `hf_checkpoint`: Hugging Face checkpoints for the LLM API, 16-bit or FP8 in NVIDIA ModelOpt's format.
- `llmapi`: the LLM API options file and the steerlm_engine.json record.
- `legacy`: Hugging Face -> TensorRT-LLM checkpoint (build/convert_checkpoint.py); `trtllm_ckpt` its format.
- `verify` + `reference`: pure-PyTorch forward of a converted checkpoint vs the model (build/verify_checkpoint.py).
- `calibrate` + `prompts`: FP8 activation ranges over SteerLM-template prompts.
- `nemo`: .nemo -> Hugging Face Llama (build/nemo_to_hf.py); `stream`: streaming safetensors I/O.
"""
