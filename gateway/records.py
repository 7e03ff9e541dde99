"""Pure builders of the output records in the Kafka contract (results, status, retry, DLQ).

Every record the gateway writes fits the broker's limit on one record
(`GATEWAY_KAFKA__MAX_REQUEST_BYTES`), measured the way the producer measures it:

- a result too large to publish becomes a `failed` result with error code
  `result_too_large` (its status record says `failed` too);
- a DLQ copy of an oversized input keeps as much of the value as fits, and says so in
  `dlq-detail`; headers that do not fit are dropped the same way.

A record may also carry a `fallback`: smaller records to write instead if the broker
refuses the record itself for good (a lower limit on the broker than configured, an
invalid record), so no single record can stop the gateway.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatchBuilder

from gateway.envelope import FIRST_WRITTEN, DlqReason, Job, Source, first_written_ms

__all__ = [
    "TERMINAL",
    "JobStatus",
    "OutRecord",
    "Status",
    "admin_record",
    "cancel_record",
    "delayed_record",
    "dlq_record",
    "dumps",
    "parse_result",
    "parse_status",
    "record_size",
    "result_record",
    "rfc3339",
    "status_record",
    "terminal_records",
]


class Status(StrEnum):
    """Job statuses of `jobs.status`; the last five are terminal (and go to results)."""

    QUEUED = "queued"
    DEFERRED = "deferred"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"


TERMINAL = frozenset(
    {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT, Status.REJECTED}
)

RecordHeaders = list[tuple[str, bytes]]

# The DLQ headers the gateway adds; never copied from an input.
_DLQ_HEADERS = frozenset(
    {"dlq-reason", "dlq-detail", "source-topic", "source-partition", "source-offset"}
)


@dataclass(frozen=True, slots=True)
class OutRecord:
    """One record to produce, and what to write instead if the broker refuses it."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: RecordHeaders
    fallback: tuple[OutRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job's transition as `jobs.status` carries it (or the terminal one of a result)."""

    tenant: str
    job_id: str
    status: Status
    attempt: int
    at: str


def parse_status(value: bytes | None) -> JobStatus | None:
    """The transition a `jobs.status` record carries, or None for anything else."""
    if value is None:
        return None
    try:
        body = json.loads(value)
        return JobStatus(
            tenant=str(body["tenant"]),
            job_id=str(body["id"]),
            status=Status(body["status"]),
            attempt=int(body.get("attempt", 0)),
            at=str(body.get("at", "")),
        )
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def parse_result(value: bytes | None) -> JobStatus | None:
    """The terminal status a `jobs.results` record carries, or None."""
    if value is None:
        return None
    try:
        body = json.loads(value)
        status = Status(body["status"])
        if status not in TERMINAL:
            return None
        return JobStatus(
            tenant=str(body["tenant"]),
            job_id=str(body["id"]),
            status=status,
            attempt=int(body.get("attempts") or 0),
            at=str(body.get("finished_at", "")),
        )
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def record_size(record: OutRecord) -> int:
    """The record's size as the producer counts it against its request limit."""
    headers: list[tuple[str, bytes | None]] = list(record.headers)
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, headers))


def dumps(value: Any) -> bytes:
    """Compact, strict JSON (no NaN) as UTF-8."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def rfc3339(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-01-02T03:04:05.678Z (as `datetime`
    renders it; the seconds part is formatted once per second, as several records a
    job share it)."""
    second, micros = divmod(round(epoch_s * 1_000_000), 1_000_000)
    cached_second, prefix = _RFC3339_SECOND
    if second != cached_second:
        prefix = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _RFC3339_SECOND[:] = [second, prefix]
    return f"{prefix}.{micros // 1000:03d}Z"


_RFC3339_SECOND: list[Any] = [None, ""]


def status_record(
    topic: str, *, tenant: str, job_id: str, status: Status, attempt: int, at: float
) -> OutRecord:
    """A `jobs.status` transition."""
    body = {"id": job_id, "tenant": tenant, "status": status.value, "attempt": attempt}
    body["at"] = rfc3339(at)
    return OutRecord(topic, job_id.encode(), dumps(body), [("tenant", tenant.encode())])


def cancel_record(topic: str, *, tenant: str, job_id: str, at: float) -> OutRecord:
    """A `jobs.control` cancel command."""
    body = {"op": "cancel", "id": job_id, "tenant": tenant, "requested_at": rfc3339(at)}
    return OutRecord(topic, job_id.encode(), dumps(body), [("tenant", tenant.encode())])


def admin_record(
    topic: str, *, op: str, tenant: str, at: float, by: str, **fields: Any
) -> OutRecord:
    """A `jobs.control` command of the admin API (`pause`, `resume`, `cancel_all`,
    `redriven`), keyed so a compacted topic keeps the latest state of each subject:
    one pause state per tenant, one mark per redriven DLQ record."""
    body = {"op": op, "tenant": tenant, "requested_at": rfc3339(at), "by": by, **fields}
    if op in ("pause", "resume"):
        key = f"state:{tenant}"
    elif op == "demand":
        key = f"demand:{fields['replica']}"
    elif op == "redriven":
        key = f"redriven:{fields['partition']}:{fields['offset']}"
    else:
        key = f"{op}:{tenant}:{fields.get('type') or '*'}:{body['requested_at']}"
    return OutRecord(topic, key.encode(), dumps(body), [("tenant", tenant.encode())])


def result_record(
    topic: str,
    *,
    tenant: str,
    job_id: str,
    job_type: str | None,
    status: Status,
    result: Any,
    error: tuple[str, str] | None,
    attempts: int,
    started_at: float,
    finished_at: float,
) -> OutRecord:
    """A terminal `jobs.results` record."""
    body = {
        "id": job_id,
        "tenant": tenant,
        "type": job_type,
        "status": status.value,
        "result": result,
        "error": None if error is None else {"code": error[0], "message": error[1]},
        "attempts": attempts,
        "started_at": rfc3339(started_at),
        "finished_at": rfc3339(finished_at),
        "duration_ms": round(max(0.0, finished_at - started_at) * 1000, 3),
    }
    headers = [
        ("tenant", tenant.encode()),
        ("job-id", job_id.encode()),
        ("status", status.value.encode()),
    ]
    return OutRecord(topic, job_id.encode(), dumps(body), headers)


def terminal_records(
    *,
    results_topic: str,
    status_topic: str,
    tenant: str,
    job_id: str,
    job_type: str | None,
    status: Status,
    result: Any,
    error: tuple[str, str] | None,
    attempts: int,
    started_at: float,
    finished_at: float,
    max_bytes: int,
) -> tuple[list[OutRecord], Status, str | None]:
    """The result and the matching terminal status of one job, fitted to `max_bytes`.

    Returns the records, the status they carry and the error code: a result over the
    limit is replaced by a `failed` one with code `result_too_large`.
    """

    def build(status: Status, result: Any, error: tuple[str, str] | None) -> list[OutRecord]:
        fields: dict[str, Any] = {
            "tenant": tenant,
            "job_id": job_id,
            "job_type": job_type,
            "attempts": attempts,
            "started_at": started_at,
            "finished_at": finished_at,
        }
        refused = result_record(
            results_topic,
            status=Status.FAILED,
            result=None,
            error=("result_rejected", "the broker refused the job's result record"),
            **fields,
        )
        record = result_record(results_topic, status=status, result=result, error=error, **fields)
        record = OutRecord(record.topic, record.key, record.value, record.headers, (refused,))
        at = finished_at
        done = status_record(
            status_topic, tenant=tenant, job_id=job_id, status=status, attempt=attempts, at=at
        )
        return [record, done]

    records = build(status, result, error)
    size = record_size(records[0])
    if size <= max_bytes:
        return records, status, error[0] if error is not None else None
    message = f"the result record is {size} bytes, over the limit of {max_bytes}"
    records = build(Status.FAILED, None, ("result_too_large", message))
    return records, Status.FAILED, "result_too_large"


def _without(headers: tuple[tuple[str, bytes | None], ...], names: frozenset[str]) -> RecordHeaders:
    """The headers without `names`, values never None, names always encodable."""
    return [
        (k if k.isascii() else _safe_text(k, len(k)), v if v is not None else b"")
        for k, v in headers
        if k not in names
    ]


def delayed_record(topic: str, job: Job, *, attempt: int, not_before_ms: int) -> OutRecord:
    """A copy of the job's original record for `jobs.retry` or `jobs.deferred`."""
    headers = _without(job.source.headers, frozenset({"attempt", "not-before", FIRST_WRITTEN}))
    headers += [
        ("attempt", str(attempt).encode()),
        ("not-before", str(not_before_ms).encode()),
        (FIRST_WRITTEN, str(first_written_ms(job.source)).encode()),
    ]
    return OutRecord(topic, job.id.encode(), job.source.value, headers)


def dlq_record(
    topic: str, source: Source, reason: DlqReason, detail: str, *, max_bytes: int
) -> OutRecord:
    """The original bytes and headers plus the DLQ headers, cut to fit `max_bytes`.

    What does not fit is cut from the end: first the value (to what fits, which may be
    nothing), then whole original headers, and `dlq-detail` says how much was kept.
    """
    detail = _safe_text(detail, 1000)
    headers = _without(source.headers, _DLQ_HEADERS)
    value = source.value
    # Keyed by where the record came from: unique, and never a null key and value both
    # (the producer refuses that, and an input may well have a null value).
    key = f"{source.topic}/{source.partition}/{source.offset}".encode()

    def build(value: bytes | None, headers: RecordHeaders, note: str) -> OutRecord:
        own = [
            ("dlq-reason", reason.value.encode()),
            ("dlq-detail", (detail + note).encode()),
            ("source-topic", source.topic.encode()),
            ("source-partition", str(source.partition).encode()),
            ("source-offset", str(source.offset).encode()),
        ]
        return OutRecord(topic, key, value, headers + own)

    record = build(value, headers, "")
    if record_size(record) > max_bytes:
        record = _cut_to_fit(build, value, headers, max_bytes)
    # If the broker refuses it anyway (a lower limit than configured): the DLQ headers.
    fallback = build(None, [], "; original value and headers dropped: the broker refused them")
    return OutRecord(record.topic, key, record.value, record.headers, (fallback,))


def _cut_to_fit(
    build: Callable[[bytes | None, RecordHeaders, str], OutRecord],
    value: bytes | None,
    headers: RecordHeaders,
    max_bytes: int,
) -> OutRecord:
    original = len(value) if value is not None else 0
    note_room = 160  # the longest note below, with its numbers
    bare = record_size(build(b"", headers, "")) + note_room
    if bare <= max_bytes:
        keep = max(0, min(original, max_bytes - bare))
        return build(
            (value or b"")[:keep], headers, f"; value truncated from {original} to {keep} bytes"
        )
    kept: RecordHeaders = []
    for header in headers:
        if record_size(build(b"", [*kept, header], "")) + note_room > max_bytes:
            break
        kept.append(header)
    note = f"; value ({original} bytes) dropped, {len(kept)} of {len(headers)} headers kept"
    return build(b"", kept, note)


def _safe_text(text: str, limit: int) -> str:
    """Text that encodes as UTF-8 (lone surrogates escaped), at most `limit` characters."""
    cut = text[:limit]
    return cut.encode("utf-8", "backslashreplace").decode("utf-8")
