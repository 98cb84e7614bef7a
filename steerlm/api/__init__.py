"""HTTP API in front of the `steerlm` Triton ensemble: OpenAI's /v1 routes and NeMo's /generate.

`make serve` starts it next to tritonserver (`--api-port`); `ApiServer` runs it in-process.
"""

from steerlm.api.app import create_app
from steerlm.api.server import ApiServer

__all__ = ["ApiServer", "create_app"]
