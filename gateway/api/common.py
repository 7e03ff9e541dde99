"""What the tenant API and the operators' listener share: the JSON error shape, Starlette's
own answers in that shape, and the health and readiness endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = ["Readiness", "error", "health", "http_error", "invalid", "readiness_endpoint"]

Readiness = Callable[[], Awaitable[list[str]]]

# Bound on the readiness checks as a whole; past it the gateway counts as stuck.
_READINESS_TIMEOUT_S = 5.0


def error(code: int, error: str, detail: Any, **extra: Any) -> JSONResponse:
    """`{"error": <code>, "detail": <text or list>, ...}` with the HTTP status `code`."""
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=code)


def invalid(exc: ValidationError) -> JSONResponse:
    """422 with pydantic's errors, without the offending input (it may be large or secret)."""
    errors = [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    return error(422, "invalid_body", errors)


async def http_error(_: Request, exc: Exception) -> Response:
    """Starlette's own answers (no such route, method not allowed) in the API's format."""
    assert isinstance(exc, HTTPException)
    name = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = error(exc.status_code, name, exc.detail)
    response.headers.update(exc.headers or {})
    return response


async def health(_: Request) -> Response:
    """`GET /healthz`: the process is alive and serving."""
    return JSONResponse({"status": "ok"})


def readiness_endpoint(readiness: Readiness) -> Callable[[Request], Awaitable[Response]]:
    """`GET /readyz`: 200 once every readiness check passes, else 503 with the reasons."""

    async def readyz(_: Request) -> Response:
        try:
            reasons = await asyncio.wait_for(readiness(), _READINESS_TIMEOUT_S)
        except TimeoutError:
            reasons = [f"readiness checks did not answer within {_READINESS_TIMEOUT_S:g}s"]
        if reasons:
            return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
        return JSONResponse({"ready": True, "reasons": []})

    return readyz
