"""The operators' listener (`GATEWAY_OPS__HOST`:`GATEWAY_OPS__PORT`, default 127.0.0.1:9464).

Never the tenant port: Prometheus metrics (their labels name tenants), health and
readiness for probes, and the admin API (`gateway.api.admin`). Nothing here is
reachable with a tenant's API key.

`/metrics` is the gateway process's registry followed by this process's own (admin
actions, redrives, the DLQ's depth): one scrape, one replica's whole picture.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.admin import AdminApi
from gateway.api.common import Readiness, error, health, http_error, readiness_endpoint
from gateway.api.dlq import DlqIndex
from gateway.api.openapi import ops_document
from gateway.metrics import CONTENT_TYPE
from gateway.settings import Settings

__all__ = ["DlqCollector", "OpsApi"]


class DlqCollector(Collector):
    """The DLQ's depth by reason, as this API process has read it."""

    def __init__(self, index: DlqIndex) -> None:
        self._index = index

    def collect(self) -> Iterator[Metric]:
        records = GaugeMetricFamily(
            "gateway_dlq_records", "Records on jobs.dlq, by reason.", labels=["reason"]
        )
        pending = GaugeMetricFamily(
            "gateway_dlq_pending",
            "Records on jobs.dlq not redriven yet, by reason (the depth to work off).",
            labels=["reason"],
        )
        for reason, count in sorted(self._index.records.items()):
            records.add_metric([reason], count)
        for reason, count in self._index.pending().items():
            pending.add_metric([reason], count)
        yield records
        yield pending


class OpsApi:
    """`/metrics`, `/healthz`, `/readyz`, `/openapi.json` and the admin API."""

    def __init__(
        self,
        *,
        settings: Settings,
        readiness: Readiness,
        render_metrics: Callable[[], Awaitable[bytes | None]],
        registry: CollectorRegistry,
        admin: AdminApi,
    ) -> None:
        self._settings = settings
        self._readiness = readiness
        self._render_metrics = render_metrics
        self._registry = registry
        self._admin = admin

    def app(self) -> Starlette:
        """The ASGI application."""
        document = ops_document(self._settings, admin=self._admin.enabled)

        async def openapi(_: Request) -> Response:
            return JSONResponse(document)

        return Starlette(
            routes=[
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/healthz", health, methods=["GET"]),
                Route("/readyz", readiness_endpoint(self._readiness), methods=["GET"]),
                Route("/openapi.json", openapi, methods=["GET"]),
                *self._admin.routes(),
            ],
            exception_handlers={HTTPException: http_error},
        )

    async def metrics(self, _: Request) -> Response:
        """`GET /metrics`: the gateway's registry, then this process's, as Prometheus text."""
        try:
            rendered = await self._render_metrics()
        except (ConnectionError, TimeoutError):
            rendered = None
        if rendered is None:  # the gateway failed to render (it logged why)
            return error(503, "unavailable", "the gateway process did not answer")
        return Response(rendered + generate_latest(self._registry), media_type=CONTENT_TYPE)
