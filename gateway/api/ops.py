"""The operators' listener (`GATEWAY_OPS__HOST`:`GATEWAY_OPS__PORT`, default 127.0.0.1:9464).

Never the tenant port: Prometheus metrics (their labels name tenants), health and
readiness for probes, and the admin API. Nothing here is reachable with a tenant's
API key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.common import Readiness, error, health, http_error, readiness_endpoint
from gateway.api.openapi import ops_document
from gateway.metrics import CONTENT_TYPE
from gateway.settings import Settings

__all__ = ["OpsApi"]


class OpsApi:
    """`/metrics`, `/healthz`, `/readyz` and `/openapi.json` for operators."""

    def __init__(
        self,
        *,
        settings: Settings,
        readiness: Readiness,
        render_metrics: Callable[[], Awaitable[bytes | None]],
    ) -> None:
        self._settings = settings
        self._readiness = readiness
        self._render_metrics = render_metrics

    def app(self) -> Starlette:
        """The ASGI application."""
        document = ops_document(self._settings)

        async def openapi(_: Request) -> Response:
            return JSONResponse(document)

        return Starlette(
            routes=[
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/healthz", health, methods=["GET"]),
                Route("/readyz", readiness_endpoint(self._readiness), methods=["GET"]),
                Route("/openapi.json", openapi, methods=["GET"]),
            ],
            exception_handlers={HTTPException: http_error},
        )

    async def metrics(self, _: Request) -> Response:
        """`GET /metrics`: the gateway's registry in the Prometheus text format."""
        try:
            rendered = await self._render_metrics()
        except (ConnectionError, TimeoutError):
            return error(503, "unavailable", "the gateway process did not answer")
        if rendered is None:  # the gateway failed to render (it logged why)
            return error(503, "unavailable", "the gateway process did not answer")
        return Response(rendered, media_type=CONTENT_TYPE)
