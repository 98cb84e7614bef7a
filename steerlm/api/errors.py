"""OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, for every route of the API."""

from __future__ import annotations

import json
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


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


def _field_of(value, bad: Callable[[str], bool], path: str = "") -> str | None:
    """The OpenAI-style path (messages[0].content) of the first string in a parsed body for which `bad` is true."""
    if isinstance(value, str):
        return (path or "body") if bad(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        found = (isinstance(key, str) and bad(key) and sub) or _field_of(item, bad, sub)
        if found:
            return found
    return None


def _lone_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


async def _undecodable(request: Request) -> ApiError | None:
    """Name the field of a body FastAPI could not parse: invalid UTF-8 bytes, or a lone UTF-16 surrogate escape.

    Python's own decoder keeps both (surrogateescape, json.loads), so the offending string can be found."""
    body = await request.body()
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        try:
            field = _field_of(json.loads(body.decode("utf-8", "surrogateescape")), _lone_surrogate)
        except ValueError:
            field = None
        where = field or "body"
        return ApiError(f"{where}: not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})", field)
    try:
        field = _field_of(json.loads(body), _lone_surrogate)
    except ValueError:
        return None
    if field:
        return ApiError(f"{field}: contains a lone UTF-16 surrogate escape, which is not a Unicode character", field)
    return None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI answers a body it cannot decode with a bare {"detail": ...}; give OpenAI's object, naming the field.
        error = await _undecodable(request) if exc.status_code == 400 else None
        if error is None:
            code = "not_found" if exc.status_code == 404 else None
            error = ApiError(str(exc.detail), None, status=exc.status_code, code=code)
        return JSONResponse(error.body(), status_code=error.status, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            error = await _undecodable(request)
            if error is not None:
                return JSONResponse(error.body(), status_code=400)
        param = _param(first.get("loc", ()))
        msg = first.get("msg", "invalid value")
        message = f"{param}: {msg}" if param else msg
        return JSONResponse(ApiError(message, param).body(), status_code=400)
