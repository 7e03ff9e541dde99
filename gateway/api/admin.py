"""The admin API (`/admin/v1/...` on the operators' listener), for the operator's token only.

`Authorization: Bearer <GATEWAY_OPS__TOKEN>`, compared in constant time (digests of equal
length); without a configured token these routes do not exist. Tenant API keys never
work here. Every action is a record on `jobs.control` that every replica applies, so it
works whichever replica the operator reaches and state (a pause) survives restarts; each
is reported to the gateway process for its audit log: who (the token's id, a digest),
what, and how many.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.common import error, invalid
from gateway.api.dlq import DlqBrowser, DlqFilter, DlqIndex
from gateway.api.statusview import StatusView
from gateway.catalog import Catalog
from gateway.envelope import MAX_ID_LENGTH
from gateway.errors import ProduceError
from gateway.records import admin_record
from gateway.settings import Settings

__all__ = ["AdminApi", "CancelAll", "Redrive", "token_id"]

log = logging.getLogger("gateway.ops")

Send = Callable[..., Awaitable[None]]
# on_action(action, by, tenant, count, detail): for the gateway's audit log.
ActionHandler = Callable[[str, str, str, int, str], None]
TenantFigures = Callable[[], Awaitable[Any]]


def token_id(token: str) -> str:
    """How audit lines name an operator's token: a short digest, never the token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


class CancelAll(BaseModel):
    """Body of `POST /admin/v1/jobs/cancel`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    tenant: str = Field(min_length=1, max_length=63)
    type: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)


class Redrive(BaseModel):
    """Body of `POST /admin/v1/dlq/redrive`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    tenant: str | None = Field(default=None, min_length=1, max_length=63)
    reason: str | None = Field(default=None, min_length=1, max_length=64)
    ids: list[str] | None = Field(default=None, max_length=10_000)
    max: int = Field(ge=1, le=100_000)
    rate_per_s: float = Field(default=50.0, gt=0, le=10_000)
    dry_run: bool = False

    @field_validator("ids")
    @classmethod
    def _ids(cls, ids: list[str] | None) -> list[str] | None:
        if ids is not None and any(not 0 < len(i) <= MAX_ID_LENGTH for i in ids):
            raise ValueError(f"each id must be 1-{MAX_ID_LENGTH} characters")
        return ids


class AdminApi:
    """The admin routes, their metrics and their dependencies in the API process."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Callable[[], Catalog],
        tenant_figures: TenantFigures,
        send: Send,
        status_view: StatusView,
        dlq_index: DlqIndex,
        dlq: DlqBrowser,
        on_action: ActionHandler,
        registry: CollectorRegistry,
    ) -> None:
        token = settings.ops.token
        self._digest = (
            hashlib.sha256(token.get_secret_value().encode()).digest()
            if token is not None
            else None
        )
        self._token_id = token_id(token.get_secret_value()) if token is not None else ""
        self._settings = settings
        self._topics = settings.topics
        self._catalog = catalog
        self._tenant_figures = tenant_figures
        self._send = send
        self._status = status_view
        self._index = dlq_index
        self._dlq = dlq
        self._on_action = on_action
        self.actions = Counter(
            "gateway_admin_actions",
            "Admin API actions taken (pause, resume, cancel_all, redrive).",
            ["action"],
            registry=registry,
        )
        self.redriven = Counter(
            "gateway_dlq_redriven",
            "DLQ records this replica sent back to jobs, by their DLQ reason.",
            ["reason"],
            registry=registry,
        )

    @property
    def enabled(self) -> bool:
        """Whether an operator token is configured (else the routes do not exist)."""
        return self._digest is not None

    def routes(self) -> list[Route]:
        """The admin routes (none without a token)."""
        if not self.enabled:
            return []
        return [
            Route("/admin/v1/tenants", self.tenants, methods=["GET"]),
            Route("/admin/v1/tenants/{tenant}/pause", self.pause, methods=["POST"]),
            Route("/admin/v1/tenants/{tenant}/resume", self.resume, methods=["POST"]),
            Route("/admin/v1/jobs/cancel", self.cancel_all, methods=["POST"]),
            Route("/admin/v1/dlq", self.dlq_list, methods=["GET"]),
            Route("/admin/v1/dlq/redrive", self.redrive, methods=["POST"]),
        ]

    def _authorized(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).digest()
        # Compare digests, not tokens: equal lengths, so timing says nothing of the token.
        return (
            self._digest is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(digest, self._digest)
        )

    def _refused(self) -> Response:
        response = error(401, "unauthorized", "missing or invalid operator token")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def _done(self, action: str, tenant: str, count: int, detail: str = "") -> None:
        self.actions.labels(action).inc()
        self._on_action(action, self._token_id, tenant, count, detail)
        log.info("admin_action_sent", extra={"action": action, "tenant": tenant, "count": count})

    async def _publish(self, op: str, tenant: str, **fields: Any) -> Response | None:
        record = admin_record(
            self._topics.control, op=op, tenant=tenant, at=time.time(), by=self._token_id, **fields
        )
        try:
            await self._send([record], tenant=tenant)
        except ProduceError:
            return error(503, "unavailable", "the command could not be sent; try again")
        return None

    # -- tenants ---------------------------------------------------------------

    async def tenants(self, request: Request) -> Response:
        """`GET /admin/v1/tenants`: who holds the queue."""
        if not self._authorized(request):
            return self._refused()
        try:
            rows = await self._tenant_figures()
        except (ConnectionError, TimeoutError):
            rows = None
        if not isinstance(rows, list):
            return error(503, "unavailable", "the gateway process did not answer")
        return JSONResponse({"replica": self._settings.replica, "tenants": rows})

    async def pause(self, request: Request) -> Response:
        """`POST /admin/v1/tenants/{tenant}/pause`."""
        return await self._state(request, "pause")

    async def resume(self, request: Request) -> Response:
        """`POST /admin/v1/tenants/{tenant}/resume`."""
        return await self._state(request, "resume")

    async def _state(self, request: Request, op: str) -> Response:
        if not self._authorized(request):
            return self._refused()
        tenant: str = request.path_params["tenant"]
        if self._catalog().get(tenant) is None:
            return error(404, "not_found", "no such tenant")
        failed = await self._publish(op, tenant)
        if failed is not None:
            return failed
        self._done(op, tenant, 1)
        state = "paused" if op == "pause" else "active"
        return JSONResponse({"tenant": tenant, "state": state}, status_code=202)

    # -- jobs --------------------------------------------------------------------

    async def cancel_all(self, request: Request) -> Response:
        """`POST /admin/v1/jobs/cancel` `{"tenant", "type"?}`: every job not finished."""
        if not self._authorized(request):
            return self._refused()
        try:
            body = CancelAll.model_validate_json(await request.body())
        except ValidationError as exc:
            return invalid(exc)
        if self._catalog().get(body.tenant) is None:
            return error(404, "not_found", "no such tenant")
        failed = await self._publish("cancel_all", body.tenant, type=body.type)
        if failed is not None:
            return failed
        # How many this replica's status view knows unfinished (all types: the view
        # keeps no type for jobs that have not ended).
        requested = self._status.unfinished(body.tenant)
        self._done("cancel_all", body.tenant, requested, f"type={body.type or '*'}")
        return JSONResponse({"requested": requested}, status_code=202)

    # -- the dead-letter queue -------------------------------------------------------

    async def dlq_list(self, request: Request) -> Response:
        """`GET /admin/v1/dlq?tenant=&reason=&limit=&cursor=`."""
        if not self._authorized(request):
            return self._refused()
        query = request.query_params
        unknown = sorted(set(query) - {"tenant", "reason", "limit", "cursor"})
        if unknown:
            return error(400, "bad_request", f"unknown query parameters: {unknown[:5]}")
        limit_text = query.get("limit", "50")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 500:
            return error(400, "bad_request", "limit must be an integer from 1 to 500")
        wanted = DlqFilter(tenant=query.get("tenant") or None, reason=query.get("reason") or None)
        try:
            entries, cursor = await self._dlq.page(wanted, int(limit_text), query.get("cursor"))
        except ValueError:
            return error(400, "bad_request", "the cursor is not one this API gave out")
        return JSONResponse({"entries": entries, "next_cursor": cursor})

    async def redrive(self, request: Request) -> Response:
        """`POST /admin/v1/dlq/redrive`: matching records back to `jobs`, paced, once each."""
        if not self._authorized(request):
            return self._refused()
        try:
            body = Redrive.model_validate_json(await request.body())
        except ValidationError as exc:
            return invalid(exc)
        ids = frozenset(body.ids) if body.ids is not None else None
        wanted = DlqFilter(tenant=body.tenant, reason=body.reason, ids=ids)
        plan = await self._dlq.plan(wanted, body.max)
        if not body.dry_run and plan.chosen:
            self._dlq.redrive(plan, body.rate_per_s, self._token_id)
            for entry in plan.chosen:
                self.redriven.labels(entry.reason).inc()
        action = "redrive_dry_run" if body.dry_run else "redrive"
        detail = f"reason={body.reason or '*'} matched={plan.matched} rate={body.rate_per_s:g}/s"
        self._done(action, body.tenant or "*", len(plan.chosen), detail)
        return JSONResponse(
            {
                "matched": plan.matched,
                "redriven": len(plan.chosen),
                "already_redriven": plan.already,
                "not_redrivable": plan.not_redrivable,
                "dry_run": body.dry_run,
            },
            status_code=202,
        )
