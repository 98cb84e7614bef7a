"""OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, for every route of the API."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request the API refuses; `param` names the request field at fault (None: the request as a whole)."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(f"{param}: {why}", param, code="unsupported_parameter")


def _param(loc) -> str | None:
    """pydantic's location (("body", "messages", 0, "content")) as OpenAI writes it: messages[0].content."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif not str(part).startswith(("function-", "list[", "str", "dict[", "union[", "literal[")):
            out += f".{part}"
    return out or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _param(first.get("loc", ()))
        msg = first.get("msg", "invalid value")
        message = f"{param}: {msg}" if param else msg
        return JSONResponse(ApiError(message, param).body(), status_code=400)
