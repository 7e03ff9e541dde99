"""Request durations: one series per listener, route template, method and status."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.timing import RequestTimer, request_histogram


async def _job(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["job_id"]})


async def _boom(_: Request) -> Response:
    raise RuntimeError("no")


def _app(registry: CollectorRegistry) -> RequestTimer:
    app = Starlette(
        routes=[
            Route("/v1/jobs/{job_id:str}", _job, methods=["GET"]),
            Route("/boom", _boom, methods=["GET"]),
        ]
    )
    return RequestTimer(app, request_histogram(registry), "tenant")


def _count(registry: CollectorRegistry, **labels: str) -> float:
    value = registry.get_sample_value("gateway_http_request_duration_seconds_count", labels)
    return value or 0.0


async def test_requests_are_counted_by_route_template_never_by_raw_path() -> None:
    registry = CollectorRegistry()
    transport = httpx.ASGITransport(app=_app(registry), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for n in range(3):
            assert (await client.get(f"/v1/jobs/job-{n}")).status_code == 200
        assert (await client.post("/v1/jobs/job-0")).status_code == 405
        assert (await client.get("/no/such/path/secret-looking")).status_code == 404
        assert (await client.get("/boom")).status_code == 500
        assert (await client.request("BREW", "/v1/jobs/x")).status_code == 405

    ok = {"listener": "tenant", "route": "/v1/jobs/{job_id}", "method": "GET", "status": "200"}
    assert _count(registry, **ok) == 3
    assert _count(registry, **{**ok, "method": "POST", "status": "405"}) == 1
    assert _count(registry, **{**ok, "method": "other", "status": "405"}) == 1
    missing = {"listener": "tenant", "route": "unmatched", "method": "GET", "status": "404"}
    assert _count(registry, **missing) == 1
    boom = {"listener": "tenant", "route": "/boom", "method": "GET", "status": "500"}
    assert _count(registry, **boom) == 1
    scraped = "\n".join(
        sample.labels.get("route", "") for family in registry.collect() for sample in family.samples
    )
    assert "job-" not in scraped
    assert "secret-looking" not in scraped


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
async def test_other_scopes_pass_through_untimed(scope_type: str) -> None:
    registry = CollectorRegistry()
    seen: list[str] = []

    async def inner(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        seen.append(scope["type"])

    timer = RequestTimer(inner, request_histogram(registry), "ops")
    await timer({"type": scope_type}, None, None)  # type: ignore[arg-type]
    assert seen == [scope_type]
    assert not [s for f in registry.collect() for s in f.samples if s.name.endswith("_count")]
