"""The tenant API: tenants submit, inspect and cancel their own jobs (Starlette).

Every job lookup is keyed by (caller's tenant, job id), so another tenant's job is
never even read. A miss is answered at once with one and the same 404, whoever owns
the id (invariant 3); whether the id belongs to someone else is found out afterwards,
off the request path, by a background task that audits and counts the attempt. So the
two cases cost the request the same work: a lookup and a queue append.

Submissions are rate limited per tenant (a token bucket per tenant from its quota's
`submit_rate_per_s` and `submit_burst`; 429 with `Retry-After`).

Handlers run in the API process, on its own loop: they read its status view and the
catalog, produce through its own outbox, and reach the gateway process (readiness,
denials) through the callables given. The tenant port serves nothing else: metrics
and the admin API are on the operators' listener (`gateway.api.ops`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.common import Readiness, error, health, http_error, invalid, readiness_endpoint
from gateway.api.openapi import tenant_document
from gateway.api.statusview import StatusView
from gateway.catalog import Catalog, Tenant, hash_api_key
from gateway.envelope import DEFAULT_PRIORITY, MAX_ID_LENGTH
from gateway.errors import ProduceError
from gateway.quotas import TokenBucket
from gateway.records import TERMINAL, JobStatus, OutRecord, Status, cancel_record, dumps, rfc3339
from gateway.records import status_record as make_status_record
from gateway.settings import Settings
from gateway.tasks import Supervisor

__all__ = ["JobSubmission", "SubmitLimiter", "TenantApi"]

log = logging.getLogger("gateway.api")

Publish = Callable[..., Awaitable[None]]
# on_denied(caller, job_id, action, source): an attempt on another tenant's job.
DenialHandler = Callable[[str, str, str, str], None]

# 404s waiting to be checked for an owner; past this, the oldest are dropped (counted).
_MISSES_BOUND = 10_000


class JobSubmission(BaseModel):
    """Body of `POST /v1/jobs`. Unknown fields, `tenant` among them, are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    type: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    payload: dict[str, Any] = Field(default_factory=dict)
    id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    deadline_s: float | None = Field(default=None, gt=0)
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=9)

    @field_validator("id", "type")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError("must be printable and not blank")
        return value


def _unauthorized() -> JSONResponse:
    response = error(401, "unauthorized", "missing or invalid API key")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _not_found() -> JSONResponse:
    # The one answer for an unknown id and for another tenant's job: same bytes.
    return error(404, "not_found", "no such job")


class SubmitLimiter:
    """A token bucket per tenant on `POST /v1/jobs`, sized from the tenant's quota."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[tuple[float, int], TokenBucket]] = {}

    def wait_s(self, tenant: Tenant, now: float) -> float:
        """0 and a token taken when the tenant may submit now; else seconds to wait."""
        limits = (tenant.quota.submit_rate_per_s, tenant.quota.submit_burst)
        found = self._buckets.get(tenant.id)
        if found is None:
            bucket = TokenBucket(limits[0], limits[1], now)
            self._buckets[tenant.id] = (limits, bucket)
        else:
            bucket = found[1]
            if found[0] != limits:  # the catalog was reloaded with new limits
                bucket.reconfigure(limits[0], limits[1], now)
                self._buckets[tenant.id] = (limits, bucket)
        if bucket.try_take(now):
            return 0.0
        return bucket.wait_s(now)


class TenantApi:
    """Request handlers over a status view, an outbox and the catalog in force.

    `job_types` are the registered type names; `publish` produces records and returns
    once they are acknowledged (raising ProduceError); `readiness` gives the reasons the
    replica is not ready; `on_denied(caller, job_id, action, source)` reports one
    attempt on another tenant's job (the gateway audits and counts it).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Callable[[], Catalog],
        job_types: Collection[str],
        publish: Publish,
        status_view: StatusView,
        readiness: Readiness,
        on_denied: DenialHandler,
        supervisor: Supervisor,
    ) -> None:
        self._settings = settings
        self._topics = settings.topics
        self._catalog = catalog
        self._types = frozenset(job_types)
        self._publish = publish
        self._status = status_view
        self._readiness = readiness
        self._on_denied = on_denied
        self._supervisor = supervisor
        self._keys_of: tuple[Catalog | None, tuple[tuple[str, Tenant], ...]] = (None, ())
        self._limiter = SubmitLimiter()
        self._misses: deque[tuple[str, str, str, str]] = deque(maxlen=_MISSES_BOUND)
        self._miss_arrived = asyncio.Event()
        self._auditor: asyncio.Task[None] | None = None
        # 404s never checked for an owner because the queue was full (a flood of misses).
        self.misses_dropped = 0

    async def start(self) -> None:
        """Start the background check of 404s for other tenants' ids."""
        if self._auditor is None:
            self._auditor = self._supervisor.spawn(self._audit_misses(), "gateway:api-audit")

    async def stop(self) -> None:
        """Check what is queued, then stop; idempotent."""
        self._check_misses()
        task, self._auditor = self._auditor, None
        await self._supervisor.cancel(task)

    def app(self) -> Starlette:
        """The ASGI application."""
        document = tenant_document(self._settings, JobSubmission.model_json_schema())

        async def openapi(_: Request) -> Response:
            return JSONResponse(document)

        return Starlette(
            routes=[
                Route("/v1/jobs", self.submit, methods=["POST"]),
                Route("/v1/jobs/{job_id:job_id}/cancel", self.cancel, methods=["POST"]),
                Route("/v1/jobs/{job_id:job_id}", self.get, methods=["GET"]),
                Route("/healthz", health, methods=["GET"]),
                Route("/readyz", readiness_endpoint(self._readiness), methods=["GET"]),
                Route("/openapi.json", openapi, methods=["GET"]),
            ],
            exception_handlers={HTTPException: http_error},
        )

    # -- authentication ------------------------------------------------------

    def _key_table(self) -> tuple[tuple[str, Tenant], ...]:
        catalog = self._catalog()
        cached_for, table = self._keys_of
        if cached_for is not catalog:
            table = tuple((h, t) for t in catalog for h in sorted(t.api_keys_sha256))
            self._keys_of = (catalog, table)
        return table

    def authenticate(self, request: Request) -> Tenant | None:
        """The tenant owning the request's bearer key, or None.

        The key's hash is compared with every stored hash in constant time and without
        stopping at a match, so timing reveals neither whether nor where it matched.
        """
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        digest = hash_api_key(key)
        found: Tenant | None = None
        for stored, tenant in self._key_table():
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found

    # -- jobs ----------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        """`POST /v1/jobs`: produce the job to `jobs` under the caller's tenant."""
        tenant = self.authenticate(request)
        if tenant is None:
            return _unauthorized()
        wait_s = self._limiter.wait_s(tenant, time.monotonic())
        if wait_s > 0:
            response = error(429, "rate_limited", "too many submissions; retry later")
            response.headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
            return response
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        try:
            submission = JobSubmission.model_validate_json(body)
        except ValidationError as exc:
            return invalid(exc)
        allowed = sorted(t for t in tenant.jobs.allowed_types if t in self._types)
        if submission.type not in allowed:
            return error(
                400,
                "type_not_allowed",
                f"job type {submission.type!r} is unknown or not allowed for this tenant",
                allowed_types=allowed,
            )
        limit = tenant.jobs.max_deadline_s
        if submission.deadline_s is not None and submission.deadline_s > limit:
            detail = [{"loc": ["deadline_s"], "msg": f"at most {limit:g}", "type": "less_than"}]
            return error(422, "invalid_body", detail)
        job_id = submission.id or uuid.uuid4().hex
        known = self._status.get((tenant.id, job_id))
        if known is not None and known.status is not Status.QUEUED:
            # Same id again (a client retrying): nothing new runs; say where it is.
            return JSONResponse({"id": job_id, "status": known.status.value}, status_code=202)
        job: dict[str, Any] = {"id": job_id, "type": submission.type, "payload": submission.payload}
        if submission.deadline_s is not None:
            job["deadline_s"] = submission.deadline_s
        if submission.priority != DEFAULT_PRIORITY:
            job["priority"] = submission.priority
        try:
            value = dumps(job)
        except ValueError:  # NaN or Infinity somewhere in the payload
            return error(422, "invalid_body", "payload must be plain JSON (no NaN or Infinity)")
        if len(value) > self._settings.max_payload_bytes:
            limit_bytes = self._settings.max_payload_bytes
            return error(413, "payload_too_large", f"the job is over {limit_bytes} bytes")
        now = time.time()
        headers = [("tenant", tenant.id.encode()), ("job-id", job_id.encode())]
        records: list[OutRecord] = []
        if known is None:
            # `queued` is acknowledged before the job exists, so no replica can publish
            # `running` ahead of it on the job's status partition.
            records.append(
                make_status_record(
                    self._topics.status,
                    tenant=tenant.id,
                    job_id=job_id,
                    status=Status.QUEUED,
                    attempt=1,
                    at=now,
                )
            )
        # Still `queued` (known): an earlier submission may have failed after its
        # status went out, so the job itself is produced again; a copy the intake has
        # already seen is recognised there as the same job and runs once.
        job_record = OutRecord(self._topics.jobs, job_id.encode(), value, headers)
        try:
            for record in (*records, job_record):
                await self._publish([record], tenant=tenant.id)
        except ProduceError as exc:
            log.warning("submit_failed", extra={"tenant": tenant.id, "error": exc.code})
            return error(503, "unavailable", "the job could not be queued; try again")
        self._status.observe(JobStatus(tenant.id, job_id, Status.QUEUED, 1, rfc3339(now)))
        log.info("job_submitted", extra={"tenant": tenant.id, "job_id": job_id})
        return JSONResponse({"id": job_id, "status": Status.QUEUED.value}, status_code=202)

    async def get(self, request: Request) -> Response:
        """`GET /v1/jobs/{id}`: latest status, and the result record once terminal."""
        tenant = self.authenticate(request)
        if tenant is None:
            return _unauthorized()
        job_id: str = request.path_params["job_id"]
        key = (tenant.id, job_id)
        status = self._status.get(key)
        if status is None:
            return self._not_found(request, tenant.id, job_id, "get")
        result = self._status.result(key) if status.status in TERMINAL else None
        head = dumps(
            {
                "id": job_id,
                "tenant": tenant.id,
                "status": status.status.value,
                "attempt": status.attempt,
                "at": status.at,
            }
        )
        # The cached record is JSON this gateway wrote (or parsed from jobs.results):
        # spliced in as is, not decoded and encoded again on every read.
        body = b"".join((head[:-1], b',"result":', result or b"null", b"}"))
        return Response(body, media_type="application/json")

    async def cancel(self, request: Request) -> Response:
        """`POST /v1/jobs/{id}/cancel`: 202 and a `jobs.control` command, or 409 if over."""
        tenant = self.authenticate(request)
        if tenant is None:
            return _unauthorized()
        job_id: str = request.path_params["job_id"]
        status = self._status.get((tenant.id, job_id))
        if status is None:
            return self._not_found(request, tenant.id, job_id, "cancel")
        if status.status in TERMINAL:
            return error(
                409,
                "already_terminal",
                f"the job is already {status.status.value}",
                status=status.status.value,
            )
        command = cancel_record(
            self._topics.control, tenant=tenant.id, job_id=job_id, at=time.time()
        )
        try:
            await self._publish([command], tenant=tenant.id)
        except ProduceError as exc:
            log.warning("cancel_failed", extra={"tenant": tenant.id, "error": exc.code})
            return error(503, "unavailable", "the cancel could not be sent; try again")
        log.info("cancel_requested", extra={"tenant": tenant.id, "job_id": job_id})
        return JSONResponse(
            {"id": job_id, "status": status.status.value, "cancel": "requested"}, status_code=202
        )

    # -- cross-tenant attempts ---------------------------------------------------

    def _not_found(self, request: Request, caller: str, job_id: str, action: str) -> Response:
        # Every miss is queued, whoever owns the id: the request does the same work.
        client = request.client
        source = f"{client.host}:{client.port}" if client is not None else "unknown"
        if len(self._misses) == _MISSES_BOUND:
            self.misses_dropped += 1
        self._misses.append((caller, job_id, action, source))
        self._miss_arrived.set()
        return _not_found()

    async def _audit_misses(self) -> None:
        while True:
            await self._miss_arrived.wait()
            self._miss_arrived.clear()
            self._check_misses()

    def _check_misses(self) -> None:
        misses = self._misses
        while misses:
            caller, job_id, action, source = misses.popleft()
            if self._status.owners(job_id) - {caller}:
                self._on_denied(caller, job_id, action, source)

    async def _read_body(self, request: Request) -> bytes | Response:
        limit = self._settings.http.max_body_bytes
        too_large = error(413, "body_too_large", f"the request body is over {limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return too_large
            chunks.append(chunk)
        return b"".join(chunks)


class _JobIdConvertor(Convertor[str]):
    """Any job id, newlines and all (Starlette's `path` stops at a newline): every id
    reaches the handler, so an odd one gets the same 401 or 404 as any other."""

    regex = "[\\s\\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", _JobIdConvertor())
