"""The HTTP control API: tenants submit, inspect and cancel their own jobs (Starlette).

Every job lookup is keyed by (caller's tenant, job id), so another tenant's job is
never even read. When the caller's lookup misses, the same fixed work follows for
every id (one membership test per tenant in the catalog) to learn whether the id
belongs to someone else; that only decides whether the attempt is audited and
counted. The answer is one and the same 404 either way (invariant 3).

Handlers run in the API process (`gateway.apiprocess`), on its own loop: they read its
status view and catalog directly, produce through its own producer, and reach the
gateway process (readiness, metrics, denial counts) through the callables given.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.audit import audit_cross_tenant
from gateway.catalog import Catalog, Tenant, hash_api_key
from gateway.envelope import MAX_ID_LENGTH
from gateway.errors import ProduceError
from gateway.metrics import CONTENT_TYPE
from gateway.openapi import openapi_document
from gateway.records import TERMINAL, OutRecord, Status, cancel_record, dumps, rfc3339
from gateway.records import status_record as make_status_record
from gateway.settings import Settings
from gateway.statusview import JobStatus, StatusView

__all__ = ["ControlApi", "JobSubmission"]

log = logging.getLogger("gateway.api")

Readiness = Callable[[], Awaitable[list[str]]]
Publish = Callable[[Sequence[OutRecord]], Awaitable[None]]

# Bound on the readiness checks as a whole; past it the gateway counts as stuck.
_READINESS_TIMEOUT_S = 5.0


class JobSubmission(BaseModel):
    """Body of `POST /v1/jobs`. Unknown fields, `tenant` among them, are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)
    id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    deadline_s: float | None = Field(default=None, gt=0)

    @field_validator("id")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError("id must be printable and not blank")
        return value


def _error(code: int, error: str, detail: Any, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=code)


def _unauthorized() -> JSONResponse:
    response = _error(401, "unauthorized", "missing or invalid API key")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _not_found() -> JSONResponse:
    # The one answer for an unknown id and for another tenant's job: same bytes.
    return _error(404, "not_found", "no such job")


class ControlApi:
    """Request handlers over a status view, a producer and the catalog in force.

    `job_types` are the registered type names; `publish` produces records and returns
    once they are acknowledged (raising ProduceError); `readiness` gives the reasons the
    gateway is not ready; `render_metrics` the Prometheus text of its registry;
    `on_denied(tenant, action)` counts one cross-tenant attempt.
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
        render_metrics: Callable[[], Awaitable[bytes]],
        on_denied: Callable[[str, str], None],
    ) -> None:
        self._settings = settings
        self._topics = settings.topics
        self._catalog = catalog
        self._types = frozenset(job_types)
        self._publish = publish
        self._status = status_view
        self._readiness = readiness
        self._render_metrics = render_metrics
        self._on_denied = on_denied
        self._keys_of: tuple[Catalog | None, tuple[tuple[str, Tenant], ...]] = (None, ())

    def app(self) -> Starlette:
        """The ASGI application."""
        document = openapi_document(self._settings, JobSubmission.model_json_schema())

        async def openapi(_: Request) -> Response:
            return JSONResponse(document)

        return Starlette(
            routes=[
                Route("/v1/jobs", self.submit, methods=["POST"]),
                Route("/v1/jobs/{job_id:job_id}/cancel", self.cancel, methods=["POST"]),
                Route("/v1/jobs/{job_id:job_id}", self.get, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/openapi.json", openapi, methods=["GET"]),
            ],
            exception_handlers={HTTPException: _http_error},
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
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        try:
            submission = JobSubmission.model_validate_json(body)
        except ValidationError as exc:
            return _invalid(exc)
        allowed = sorted(t for t in tenant.jobs.allowed_types if t in self._types)
        if submission.type not in allowed:
            return _error(
                400,
                "type_not_allowed",
                f"job type {submission.type!r} is unknown or not allowed for this tenant",
                allowed_types=allowed,
            )
        job_id = submission.id or uuid.uuid4().hex
        known = self._status.get((tenant.id, job_id))
        if known is not None:
            # Same id again (a client retrying): nothing new runs; say where it is.
            return JSONResponse({"id": job_id, "status": known.status.value}, status_code=202)
        job: dict[str, Any] = {"id": job_id, "type": submission.type, "payload": submission.payload}
        if submission.deadline_s is not None:
            job["deadline_s"] = submission.deadline_s
        try:
            value = dumps(job)
        except ValueError:  # NaN or Infinity somewhere in the payload
            return _error(422, "invalid_body", "payload must be plain JSON (no NaN or Infinity)")
        if len(value) > self._settings.max_payload_bytes:
            limit = self._settings.max_payload_bytes
            return _error(413, "payload_too_large", f"the job is over {limit} bytes")
        now = time.time()
        queued = make_status_record(
            self._topics.status,
            tenant=tenant.id,
            job_id=job_id,
            status=Status.QUEUED,
            attempt=1,
            at=now,
        )
        headers = [("tenant", tenant.id.encode()), ("job-id", job_id.encode())]
        record = OutRecord(self._topics.jobs, job_id.encode(), value, headers)
        seen = JobStatus(tenant.id, job_id, Status.QUEUED, 1, rfc3339(now))

        try:
            # `queued` is acknowledged before the job exists, so no replica can publish
            # `running` ahead of it on the job's status partition.
            await self._publish([queued])
            await self._publish([record])
        except ProduceError as exc:
            log.warning("submit_failed", extra={"tenant": tenant.id, "error": exc.code})
            return _error(503, "unavailable", "the job could not be queued; try again")
        self._status.observe(seen)
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
            return _error(
                409,
                "already_terminal",
                f"the job is already {status.status.value}",
                status=status.status.value,
            )
        command = cancel_record(
            self._topics.control, tenant=tenant.id, job_id=job_id, at=time.time()
        )
        try:
            await self._publish([command])
        except ProduceError as exc:
            log.warning("cancel_failed", extra={"tenant": tenant.id, "error": exc.code})
            return _error(503, "unavailable", "the cancel could not be sent; try again")
        log.info("cancel_requested", extra={"tenant": tenant.id, "job_id": job_id})
        return JSONResponse(
            {"id": job_id, "status": status.status.value, "cancel": "requested"}, status_code=202
        )

    def _not_found(self, request: Request, caller: str, job_id: str, action: str) -> Response:
        owned_elsewhere = False
        for tenant_id in self._catalog().tenants:
            # No early exit: the same lookups for every id, whoever owns it.
            owned_elsewhere |= tenant_id != caller and self._status.knows((tenant_id, job_id))
        if owned_elsewhere:
            client = request.client
            source = f"{client.host}:{client.port}" if client is not None else "unknown"
            audit_cross_tenant(tenant=caller, job_id=job_id, action=action, source=source)
            self._on_denied(caller, action)
        return _not_found()

    async def _read_body(self, request: Request) -> bytes | Response:
        limit = self._settings.http.max_body_bytes
        too_large = _error(413, "body_too_large", f"the request body is over {limit} bytes")
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

    # -- operations ------------------------------------------------------------

    async def healthz(self, _: Request) -> Response:
        """`GET /healthz`: the process is alive and serving."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, _: Request) -> Response:
        """`GET /readyz`: 200 once every readiness check passes, else 503 with reasons."""
        try:
            reasons = await asyncio.wait_for(self._readiness(), _READINESS_TIMEOUT_S)
        except TimeoutError:
            reasons = [f"readiness checks did not answer within {_READINESS_TIMEOUT_S:g}s"]
        if reasons:
            return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
        return JSONResponse({"ready": True, "reasons": []})

    async def metrics(self, _: Request) -> Response:
        """`GET /metrics`: the gateway's registry in the Prometheus text format."""
        try:
            rendered = await self._render_metrics()
        except (ConnectionError, TimeoutError):
            return _error(503, "unavailable", "the gateway process did not answer")
        return Response(rendered, media_type=CONTENT_TYPE)


class _JobIdConvertor(Convertor[str]):
    """Any job id, newlines and all (Starlette's `path` stops at a newline): every id
    reaches the handler, so an odd one gets the same 401 or 404 as any other."""

    regex = "[\\s\\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", _JobIdConvertor())


async def _http_error(_: Request, exc: Exception) -> Response:
    """Starlette's own answers (no such route, method not allowed) in the API's format."""
    assert isinstance(exc, HTTPException)
    error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = _error(exc.status_code, error, exc.detail)
    response.headers.update(exc.headers or {})
    return response


def _invalid(exc: ValidationError) -> JSONResponse:
    errors = [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    return _error(422, "invalid_body", errors)
