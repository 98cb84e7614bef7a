"""`make engine`: memory plan, then the LLM API directory (default) or the legacy TensorRT-LLM engine.

The logic lives in steerlm.convert.engine; run `python build/build_engine.py --help` for the flags.
"""

from steerlm.convert.engine import main

if __name__ == "__main__":
    main()
