"""Errors in OpenAI's JSON shape, and the handlers that guarantee every failure uses it.

Client mistakes are 4xx with the field named; only our own bugs may be a 500 (and are counted in
``moe_request_errors_total`` so the error-rate alert sees them). A body that does not match its schema -
a missing field, a wrong type, a value out of bounds, a field this server does not support, malformed
JSON - is a 400, as OpenAI and vLLM answer it (FastAPI's default would be a 422).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_json(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    body = {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def _param(err: dict) -> str:
    if err.get("type") == "json_invalid":  # its location is a character position, not a field
        return "body"
    return _loc(tuple(err.get("loc", ())))


def describe(err: dict) -> str:
    """One pydantic error in OpenAI's words, naming the field (and the value, when it is short)."""
    from runtime.server.schemas import UNSUPPORTED

    loc = tuple(err.get("loc", ()))
    param = _param(err)
    kind = err.get("type", "")
    if kind == "missing":
        return f"Missing required parameter: '{param}'."
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else param
        if name in UNSUPPORTED:
            return f"'{param}' is not supported by this server: {UNSUPPORTED[name][0]}."
        return f"Unrecognized request argument supplied: '{param}'."
    if kind == "json_invalid":
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return f"The body is not valid JSON{where}: {err.get('ctx', {}).get('error', err.get('msg'))}."
    if param == "body" and isinstance(err.get("input"), bytes | str):
        return "The body is not valid JSON: send a JSON object with Content-Type: application/json."
    value = repr(err.get("input"))
    shown = f" (got {value})" if len(value) <= 80 else ""
    return f"Invalid value for '{param}': {err.get('msg')}{shown}."


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route with a body; this server answers those errors with a 400."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    if isinstance(op, dict):
                        op.get("responses", {}).pop("422", None)
        return app.openapi_schema

    app.openapi = openapi


def install(app: FastAPI, metrics=None) -> None:
    _openapi_without_422(app)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_json(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        param = _param(first)
        msgs = " ".join(describe(e) for e in errs[:5])
        if metrics is not None:
            metrics.rejected.labels("invalid_request").inc()
        kind = first.get("type", "")
        code = {"missing": "missing_required_parameter", "extra_forbidden": "unsupported_parameter"}
        return error_json(400, msgs, param, code.get(kind, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_json(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("unhandled error")
        if metrics is not None:
            metrics.errors.labels("internal").inc()
        return error_json(500, f"internal error: {type(exc).__name__}")
