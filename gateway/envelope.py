"""Pure parsing of a `jobs` record into a Job, or into a DLQ reason; never raises."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.catalog import Catalog

__all__ = [
    "MAX_ID_LENGTH",
    "DlqReason",
    "Job",
    "Rejection",
    "Source",
    "header_value",
    "parse_record",
]

MAX_ID_LENGTH = 256
Headers = Sequence[tuple[str, bytes | None]]


class DlqReason(StrEnum):
    """The contract's dead-letter reasons."""

    MALFORMED_JSON = "malformed_json"
    MISSING_TENANT = "missing_tenant"
    UNKNOWN_TENANT = "unknown_tenant"
    TENANT_MISMATCH = "tenant_mismatch"
    INVALID_JOB = "invalid_job"
    UNKNOWN_TYPE = "unknown_type"
    TYPE_NOT_ALLOWED = "type_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    MAX_ATTEMPTS_EXCEEDED = "max_attempts_exceeded"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record came from, and its raw form for re-publishing."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Job:
    """A valid job, attributed to its tenant."""

    tenant: str
    id: str
    type: str
    payload: Mapping[str, Any]
    deadline_s: float | None
    max_attempts: int | None
    attempt: int
    not_before_ms: int | None
    idempotency_key: str | None
    source: Source = field(repr=False)

    @property
    def key(self) -> tuple[str, str]:
        """Identity used for idempotency and cancellation: ids are unique per tenant."""
        return (self.tenant, self.id)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that goes to the DLQ; tenant and id are set when they were learned."""

    reason: DlqReason
    detail: str
    source: Source = field(repr=False)
    tenant: str | None = None
    job_id: str | None = None
    job_type: str | None = None


def header_value(headers: Headers, name: str) -> list[bytes | None]:
    """All values of a header, in order (Kafka allows repeats)."""
    return [value for key, value in headers if key == name]


def _single_text(headers: Headers, name: str) -> tuple[str | None, str | None]:
    """(value, problem): the one UTF-8 value of a header, or why there is none."""
    values = header_value(headers, name)
    if not values:
        return None, None
    if len(values) > 1:
        return None, f"{len(values)} '{name}' headers"
    raw = values[0]
    if raw is None:
        return None, f"'{name}' header has no value"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, f"'{name}' header is not valid UTF-8"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _int_header(headers: Headers, name: str) -> int | None:
    text, problem = _single_text(headers, name)
    if problem is not None:
        raise ValueError(problem)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"'{name}' header is not an integer") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_record(
    *,
    source: Source,
    catalog: Catalog,
    known_types: Collection[str],
    max_payload_bytes: int,
) -> Job | Rejection:
    """Turn one record into a Job or a Rejection; total over every possible input."""
    headers = source.headers

    def reject(reason: DlqReason, detail: str, **known: str | None) -> Rejection:
        return Rejection(reason=reason, detail=detail, source=source, **known)

    tenant_values = header_value(headers, "tenant")
    if len(tenant_values) > 1:
        distinct = set(tenant_values)
        detail = "duplicate 'tenant' headers" + (
            " with different values" if len(distinct) > 1 else ""
        )
        return reject(DlqReason.TENANT_MISMATCH, detail)
    tenant_id, problem = _single_text(headers, "tenant")
    if problem is not None:
        return reject(DlqReason.MISSING_TENANT, problem)
    if not tenant_id:
        return reject(DlqReason.MISSING_TENANT, "no 'tenant' header")
    tenant = catalog.get(tenant_id)
    if tenant is None:
        return reject(DlqReason.UNKNOWN_TENANT, "tenant is not in the catalog")

    header_id, problem = _single_text(headers, "job-id")
    if problem is not None:
        return reject(DlqReason.INVALID_JOB, problem, tenant=tenant.id)

    value = source.value
    if value is None:
        return reject(DlqReason.MALFORMED_JSON, "record has no value", tenant=tenant.id)
    if len(value) > max_payload_bytes:
        return reject(
            DlqReason.PAYLOAD_TOO_LARGE,
            f"value is {len(value)} bytes, limit {max_payload_bytes}",
            tenant=tenant.id,
            job_id=header_id,
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return reject(DlqReason.MALFORMED_JSON, "value is not valid UTF-8", tenant=tenant.id)
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = "value is not JSON" if isinstance(exc, RecursionError) else str(exc)[:200]
        return reject(DlqReason.MALFORMED_JSON, detail, tenant=tenant.id, job_id=header_id)
    if not isinstance(body, dict):
        return reject(
            DlqReason.INVALID_JOB, "value is not a JSON object", tenant=tenant.id, job_id=header_id
        )

    body_tenant = body.get("tenant")
    if body_tenant is not None and body_tenant != tenant.id:
        return reject(
            DlqReason.TENANT_MISMATCH,
            "body 'tenant' differs from the 'tenant' header",
            tenant=tenant.id,
        )

    job_id = body.get("id", header_id)
    if not isinstance(job_id, str) or not job_id.strip():
        return reject(DlqReason.INVALID_JOB, "'id' must be a non-empty string", tenant=tenant.id)
    if len(job_id) > MAX_ID_LENGTH or not job_id.isprintable():
        return reject(
            DlqReason.INVALID_JOB,
            f"'id' must be printable and at most {MAX_ID_LENGTH} characters",
            tenant=tenant.id,
        )
    if header_id is not None and header_id != job_id:
        return reject(
            DlqReason.INVALID_JOB, "'job-id' header differs from body 'id'", tenant=tenant.id
        )
    known: dict[str, str | None] = {"tenant": tenant.id, "job_id": job_id}

    job_type = body.get("type")
    if not isinstance(job_type, str) or not job_type:
        return reject(DlqReason.INVALID_JOB, "'type' must be a non-empty string", **known)
    payload = body.get("payload", {})
    if not isinstance(payload, dict):
        return reject(DlqReason.INVALID_JOB, "'payload' must be a JSON object", **known)
    deadline_s = body.get("deadline_s")
    if deadline_s is not None and (
        not _is_number(deadline_s) or not math.isfinite(deadline_s) or deadline_s <= 0
    ):
        return reject(DlqReason.INVALID_JOB, "'deadline_s' must be a positive number", **known)
    max_attempts = body.get("max_attempts")
    if max_attempts is not None and (
        not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1
    ):
        return reject(DlqReason.INVALID_JOB, "'max_attempts' must be an integer >= 1", **known)
    try:
        attempt = _int_header(headers, "attempt") or 1
        not_before_ms = _int_header(headers, "not-before")
    except ValueError as exc:
        return reject(DlqReason.INVALID_JOB, str(exc), **known)
    if attempt < 1:
        return reject(DlqReason.INVALID_JOB, "'attempt' header must be >= 1", **known)
    idempotency_key, problem = _single_text(headers, "idempotency-key")
    if problem is not None:
        return reject(DlqReason.INVALID_JOB, problem, **known)

    if job_type not in known_types:
        return reject(DlqReason.UNKNOWN_TYPE, f"unknown job type {job_type[:100]!r}", **known)
    if job_type not in tenant.jobs.allowed_types:
        return reject(
            DlqReason.TYPE_NOT_ALLOWED, f"type {job_type!r} is not allowed for this tenant", **known
        )

    return Job(
        tenant=tenant.id,
        id=job_id,
        type=job_type,
        payload=payload,
        deadline_s=float(deadline_s) if deadline_s is not None else None,
        max_attempts=max_attempts,
        attempt=attempt,
        not_before_ms=not_before_ms,
        idempotency_key=idempotency_key,
        source=source,
    )
