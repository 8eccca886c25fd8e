"""Error mapping: domain errors and request validation to HTTP statuses, one table.

Every error body is ``{"error": message, "code": name, "reason": REASON, "metadata":
{...}}``: the reason and metadata are the service error's (those gRPC puts in its
ErrorInfo); errors the HTTP layer finds itself (validation, an unknown route, a body
over the limit, a missing token) carry the reason of their kind (INVALID_ARGUMENT,
QUOTA_EXCEEDED, UNAUTHENTICATED, INTERNAL). Validation errors are 400 (not FastAPI's
422) so that both transports say "invalid argument" alike. Anything unmapped is a
500 with a generic body, logged with its traceback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adamserve.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    TooManyRequests,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("adamserve.http")
refused_log = logging.getLogger("adamserve.refused")  # refusals: reason and message

STATUS: dict[type[ServiceError], int] = {
    InvalidArgument: 400,
    NotFound: 404,
    AlreadyExists: 409,
    FailedPrecondition: 409,
    ResourceExhausted: 413,
    TooManyRequests: 429,
    Unauthenticated: 401,
    PermissionDenied: 403,
    Unavailable: 503,
    Aborted: 409,
    DeadlineExceeded: 408,
}

# Codes for statuses that starlette raises itself (unknown route, wrong method, ...).
_CODES: dict[int, str] = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    408: "deadline_exceeded",
    409: "failed_precondition",
    413: "resource_exhausted",
    415: "unsupported_media_type",
    429: "resource_exhausted",
    503: "unavailable",
}

# Reasons of the errors the HTTP layer finds itself, by status (else INVALID_ARGUMENT).
_REASONS: dict[int, str] = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                            413: "QUOTA_EXCEEDED", 500: "INTERNAL",
                            503: "INTERNAL"}

_MAX_ERRORS_SHOWN = 5


def error_response(status: int, message: str, code: str | None = None,
                   headers: Mapping[str, str] | None = None, *, reason: str | None = None,
                   metadata: Mapping[str, str] | None = None) -> JSONResponse:
    reason = reason or _REASONS.get(status, "INVALID_ARGUMENT")
    if status < 500:  # a refusal: its reason and message, never the payload
        refused_log.info("http %d %s: %s", status, reason, message)
    return JSONResponse({"error": message, "code": code or _CODES.get(status, "internal"),
                         "reason": reason, "metadata": dict(metadata or {})},
                        status_code=status, headers=dict(headers) if headers else None)


def status_of(exc: ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _location(loc: Iterable[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or "body"


def describe_validation(errors: Iterable[Any]) -> str:
    """One line from pydantic's error list: ``where: what`` for the first few errors."""
    items = list(errors)
    lines = []
    for err in items[:_MAX_ERRORS_SHOWN]:
        if not isinstance(err, Mapping):
            lines.append(str(err))
            continue
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            lines.append(f"invalid JSON: {ctx.get('error', err.get('msg', ''))}")
            continue
        lines.append(f"{_location(err.get('loc', ()))}: {err.get('msg', 'invalid')}")
    if len(items) > _MAX_ERRORS_SHOWN:
        lines.append(f"and {len(items) - _MAX_ERRORS_SHOWN} more")
    return "; ".join(lines) or "invalid request"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return answer(exc, request)


def answer(exc: ServiceError, request: Request | None = None) -> JSONResponse:
    """The response a domain error gets (the gate's own refusals included)."""
    status = status_of(exc)
    if status == 500:
        where = f" on {request.method} {request.url.path}" if request is not None else ""
        log.error("unmapped service error%s: %r", where, exc)
        return error_response(500, "internal error", "internal")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if exc.retry_after is not None:  # whole seconds, at least 1 (RFC 9110's delay-seconds)
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return error_response(status, str(exc), exc.code, headers, reason=exc.reason,
                          metadata=exc.metadata)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, describe_validation(exc.errors()), "invalid_argument")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), None, exc.headers)


async def _disconnect(request: Request, exc: Exception) -> JSONResponse:
    # The client went away (or the body cap cut it off); nobody reads this.
    return error_response(400, "client disconnected", "invalid_argument")


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error", "internal")


_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
    ServiceError: _service_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    ClientDisconnect: _disconnect,
    Exception: _internal,
}


def install(app: FastAPI) -> None:
    for cls, handler in _HANDLERS.items():
        app.add_exception_handler(cls, handler)


async def handle(request: Request, exc: Exception) -> JSONResponse:
    """The answer the app's handlers give ``exc``, for routes the gate serves itself."""
    for cls in type(exc).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is not None:
            return await handler(request, exc)
    return await _internal(request, exc)
