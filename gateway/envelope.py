"""Pure parsing of a `jobs` record into a Job, or into a DLQ reason; never raises.

The function is total: whatever the bytes, headers, numbers, nesting or encoding of a
record, it yields a `Job` within the contract's limits or a `Rejection` with the
contract's reason. The limits (the `jobs` contract):

- at most `MAX_HEADERS` headers and `MAX_HEADER_BYTES` of header names and values,
  not counting the gateway's own (`attempt`, `not-before`, `redriven-from`), which may
  each appear once (`invalid_headers`);
- a job id is 1-`MAX_ID_LENGTH` printable characters; `type` likewise;
- `deadline_s` is a finite number > 0 and at most the tenant's `max_deadline_s`;
  `max_attempts` an integer 1-`MAX_ATTEMPTS_LIMIT`; `priority` an integer 0-9;
- the value is strict JSON: no NaN or Infinity (nor numbers that overflow to it), no
  unpaired surrogates, nesting at most `MAX_DEPTH` deep;
- `attempt` is 1-`MAX_ATTEMPTS_LIMIT` and `not-before` an epoch-ms time no later than
  `max_delay_ms` after now.

Anything else is `invalid_job` (or the more specific reason below).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.catalog import MAX_ATTEMPTS_LIMIT, Catalog
from gateway.settings import Settings

__all__ = [
    "DEFAULT_PRIORITY",
    "FIRST_WRITTEN",
    "GATEWAY_HEADERS",
    "MAX_DEPTH",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_ID_LENGTH",
    "DlqReason",
    "InputLimits",
    "Job",
    "Rejection",
    "Source",
    "first_written_ms",
    "header_bytes",
    "header_value",
    "input_limits",
    "parse_record",
    "valid_id",
]

MAX_ID_LENGTH = 200
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16 * 1024
MAX_DEPTH = 64
DEFAULT_PRIORITY = 5
PRIORITIES = range(10)
# Headers the gateway itself adds to the copies it writes (retries, deferrals, redrives).
GATEWAY_HEADERS = frozenset({"attempt", "not-before", "redriven-from", "first-written-ms"})
# Room the gateway's own headers may take beyond the tenant-facing header bound.
_GATEWAY_HEADER_SLACK = 512
# An escaped UTF-16 surrogate (`\ud800`-`\udfff`): the only way JSON text decoded as
# strict UTF-8 can produce one; a pair is fine, a lone one is not valid Unicode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

Headers = Sequence[tuple[str, bytes | None]]


class DlqReason(StrEnum):
    """The contract's dead-letter reasons."""

    MALFORMED_JSON = "malformed_json"
    MISSING_TENANT = "missing_tenant"
    UNKNOWN_TENANT = "unknown_tenant"
    TENANT_MISMATCH = "tenant_mismatch"
    INVALID_JOB = "invalid_job"
    INVALID_HEADERS = "invalid_headers"
    UNKNOWN_TYPE = "unknown_type"
    TYPE_NOT_ALLOWED = "type_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    MAX_ATTEMPTS_EXCEEDED = "max_attempts_exceeded"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record came from, and its raw form for re-publishing."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class InputLimits:
    """Bounds that come from settings rather than the contract."""

    max_payload_bytes: int
    # How far in the future a `not-before` may lie (retry backoff and deferral delays
    # are capped below it).
    max_delay_ms: int


def input_limits(settings: Settings) -> InputLimits:
    """The limits in force: a job's value must leave room, within the broker's record
    limit, for its headers and the gateway's own, so its retry copy always fits."""
    reserve = MAX_HEADER_BYTES + _GATEWAY_HEADER_SLACK + 1024
    payload = min(settings.max_payload_bytes, settings.kafka.max_request_bytes - reserve)
    return InputLimits(max_payload_bytes=payload, max_delay_ms=int(settings.max_delay_s * 1000))


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
    priority: int = DEFAULT_PRIORITY

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


# On copies in `jobs.retry` and `jobs.deferred`: when the job's record was first
# written to `jobs` (epoch ms). A bulk cancel covers jobs written before it was asked
# for, and a copy is written later than the job it carries.
FIRST_WRITTEN = "first-written-ms"


def first_written_ms(source: Source) -> int:
    """When the job's record was first written: the record's own time, or the earlier
    one a copy carries. The earlier of the two, so a header cannot move a record out
    of a bulk cancel's reach."""
    written = source.timestamp_ms
    for value in header_value(source.headers, FIRST_WRITTEN):
        try:
            stamp = int(value or b"")
        except ValueError:
            continue
        if 0 <= stamp < written:
            written = stamp
    return written


def header_bytes(headers: Headers) -> int:
    """Bytes of header names and values (names as UTF-8; an unencodable name counts its
    characters four times, the most UTF-8 could take)."""
    total = 0
    for key, value in headers:
        total += len(key) * 4 if not key.isascii() else len(key)
        total += len(value) if value is not None else 0
    return total


def valid_id(value: object) -> bool:
    """A job id (or type name) as the contract allows: 1-200 printable characters."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isprintable()
        and not value.isspace()
    )


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


def _finite_float(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError("a number overflows to infinity")
    return number


def _int_header(headers: Headers, name: str, low: int, high: int) -> int | None:
    text, problem = _single_text(headers, name)
    if problem is not None:
        raise ValueError(problem)
    if text is None:
        return None
    if not text.isascii() or not text.lstrip("-").isdigit() or len(text) > 20:
        raise ValueError(f"'{name}' header is not an integer")
    number = int(text)
    if not low <= number <= high:
        raise ValueError(f"'{name}' header is out of range")
    return number


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _header_problem(headers: Headers) -> str | None:
    """Why the record's headers break the contract's bounds, or None."""
    own = [key for key, _ in headers if key in GATEWAY_HEADERS]
    if len(headers) - len(own) > MAX_HEADERS:
        return f"{len(headers) - len(own)} headers, at most {MAX_HEADERS}"
    if len(own) != len(set(own)):
        return f"a gateway header ({', '.join(sorted(GATEWAY_HEADERS))}) appears twice"
    size = header_bytes(headers)
    if size > MAX_HEADER_BYTES + _GATEWAY_HEADER_SLACK:
        return f"{size} bytes of headers, at most {MAX_HEADER_BYTES}"
    return None


def _tree_problem(text: str, body: Any) -> str | None:
    """Nesting deeper than MAX_DEPTH, or a lone surrogate in any string, or None.

    Cheap tests on the text decide whether the walk is needed at all: nesting that
    deep needs that many brackets, and a surrogate needs a `\\uD8..` escape.
    """
    deep = text.count("{") + text.count("[") > MAX_DEPTH
    surrogates = "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None
    if not (deep or surrogates):
        return None
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            for key, value in item.items():
                if surrogates and not _encodable(key):
                    return "a string is not valid Unicode (unpaired surrogate)"
                stack.append((value, depth + 1))
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            stack.extend((value, depth + 1) for value in item)
        elif surrogates and isinstance(item, str) and not _encodable(item):
            return "a string is not valid Unicode (unpaired surrogate)"
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_record(
    *,
    source: Source,
    catalog: Catalog,
    known_types: Collection[str],
    limits: InputLimits,
    now_ms: int,
) -> Job | Rejection:
    """Turn one record into a Job or a Rejection; total over every possible input."""
    headers = source.headers

    def reject(reason: DlqReason, detail: str, **known: str | None) -> Rejection:
        return Rejection(reason=reason, detail=detail, source=source, **known)

    # Tenant first: a rejection names it when it can, whatever else is wrong.
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

    header_id, id_problem = _single_text(headers, "job-id")
    id_known = header_id if valid_id(header_id) else None
    problem = _header_problem(headers)
    if problem is not None:
        return reject(DlqReason.INVALID_HEADERS, problem, tenant=tenant.id, job_id=id_known)
    if id_problem is not None:
        return reject(DlqReason.INVALID_JOB, id_problem, tenant=tenant.id)
    if header_id is not None and id_known is None:
        return reject(
            DlqReason.INVALID_JOB,
            f"'job-id' header must be 1-{MAX_ID_LENGTH} printable characters",
            tenant=tenant.id,
        )

    value = source.value
    if value is None:
        return reject(
            DlqReason.MALFORMED_JSON, "record has no value", tenant=tenant.id, job_id=id_known
        )
    if len(value) > limits.max_payload_bytes:
        return reject(
            DlqReason.PAYLOAD_TOO_LARGE,
            f"value is {len(value)} bytes, limit {limits.max_payload_bytes}",
            tenant=tenant.id,
            job_id=id_known,
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return reject(
            DlqReason.MALFORMED_JSON, "value is not valid UTF-8", tenant=tenant.id, job_id=id_known
        )
    try:
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        return reject(
            DlqReason.MALFORMED_JSON,
            "value is nested too deeply",
            tenant=tenant.id,
            job_id=id_known,
        )
    except ValueError as exc:
        return reject(DlqReason.MALFORMED_JSON, str(exc)[:200], tenant=tenant.id, job_id=id_known)
    if not isinstance(body, dict):
        return reject(
            DlqReason.INVALID_JOB, "value is not a JSON object", tenant=tenant.id, job_id=id_known
        )
    body_id = body.get("id")
    if id_known is None and valid_id(body_id) and body.get("tenant") in (None, tenant.id):
        id_known = body_id
    problem = _tree_problem(text, body)
    if problem is not None:
        return reject(DlqReason.INVALID_JOB, problem, tenant=tenant.id, job_id=id_known)

    body_tenant = body.get("tenant")
    if body_tenant is not None and body_tenant != tenant.id:
        return reject(
            DlqReason.TENANT_MISMATCH,
            "body 'tenant' differs from the 'tenant' header",
            tenant=tenant.id,
        )

    job_id = body.get("id", header_id)
    if not valid_id(job_id):
        return reject(
            DlqReason.INVALID_JOB,
            f"'id' must be 1-{MAX_ID_LENGTH} printable characters",
            tenant=tenant.id,
        )
    assert isinstance(job_id, str)
    if header_id is not None and header_id != job_id:
        return reject(
            DlqReason.INVALID_JOB, "'job-id' header differs from body 'id'", tenant=tenant.id
        )
    known: dict[str, str | None] = {"tenant": tenant.id, "job_id": job_id}

    job_type = body.get("type")
    if not valid_id(job_type):
        return reject(
            DlqReason.INVALID_JOB, f"'type' must be 1-{MAX_ID_LENGTH} printable characters", **known
        )
    assert isinstance(job_type, str)
    payload = body.get("payload", {})
    if not isinstance(payload, dict):
        return reject(DlqReason.INVALID_JOB, "'payload' must be a JSON object", **known)
    deadline_s = body.get("deadline_s")
    if deadline_s is not None:
        limit = tenant.jobs.max_deadline_s
        if not _is_number(deadline_s) or not 0 < deadline_s <= limit:
            return reject(
                DlqReason.INVALID_JOB, f"'deadline_s' must be a number in (0, {limit:g}]", **known
            )
    max_attempts = body.get("max_attempts")
    if max_attempts is not None and (
        not _is_int(max_attempts) or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
    ):
        return reject(
            DlqReason.INVALID_JOB,
            f"'max_attempts' must be an integer from 1 to {MAX_ATTEMPTS_LIMIT}",
            **known,
        )
    priority = body.get("priority", DEFAULT_PRIORITY)
    if not _is_int(priority) or priority not in PRIORITIES:
        return reject(DlqReason.INVALID_JOB, "'priority' must be an integer from 0 to 9", **known)
    try:
        attempt = _int_header(headers, "attempt", 1, MAX_ATTEMPTS_LIMIT) or 1
        not_before_ms = _int_header(headers, "not-before", 0, now_ms + limits.max_delay_ms)
    except ValueError as exc:
        return reject(DlqReason.INVALID_JOB, str(exc), **known)
    idempotency_key, problem = _single_text(headers, "idempotency-key")
    if problem is None and idempotency_key is not None and not valid_id(idempotency_key):
        problem = f"'idempotency-key' header must be 1-{MAX_ID_LENGTH} printable characters"
    if problem is not None:
        return reject(DlqReason.INVALID_JOB, problem, **known)

    if job_type not in known_types:
        return reject(DlqReason.UNKNOWN_TYPE, f"unknown job type {job_type!r}", **known)
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
        priority=priority,
    )
