"""Request durations of one listener, as `gateway_http_request_duration_seconds`.

Labels stay bounded: `route` is the matched route's template (`/v1/jobs/{job_id}`),
never the raw path, and a request no route matched counts as `unmatched`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestTimer", "request_histogram"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def request_histogram(registry: CollectorRegistry) -> Histogram:
    """The histogram both listeners of the API process observe into."""
    return Histogram(
        "gateway_http_request_duration_seconds",
        "HTTP requests from their arrival to the last byte of the answer.",
        ["listener", "route", "method", "status"],
        buckets=_BUCKETS,
        registry=registry,
    )


class RequestTimer:
    """ASGI middleware: times every HTTP request of `app` under `listener`."""

    def __init__(self, app: ASGIApp, histogram: Histogram, listener: str) -> None:
        self._app = app
        self._histogram = histogram
        self._listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app answers: an exception before any answer is a 500

        async def send_timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_timed)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self._histogram.labels(self._listener, template, method, str(status)).observe(
                time.perf_counter() - started
            )


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
