"""Pure builders of the output records in the Kafka contract (results, status, retry, DLQ)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from gateway.envelope import DlqReason, Job, Source

__all__ = [
    "TERMINAL",
    "OutRecord",
    "Status",
    "cancel_record",
    "delayed_record",
    "dlq_record",
    "dumps",
    "result_record",
    "rfc3339",
    "status_record",
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


@dataclass(frozen=True, slots=True)
class OutRecord:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: RecordHeaders


def dumps(value: Any) -> bytes:
    """Compact, strict JSON (no NaN) as UTF-8."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def rfc3339(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-01-02T03:04:05.678Z."""
    stamp = datetime.fromtimestamp(epoch_s, tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


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


def _without(headers: tuple[tuple[str, bytes | None], ...], names: set[str]) -> RecordHeaders:
    return [(k, v if v is not None else b"") for k, v in headers if k not in names]


def delayed_record(topic: str, job: Job, *, attempt: int, not_before_ms: int) -> OutRecord:
    """A copy of the job's original record for `jobs.retry` or `jobs.deferred`."""
    headers = _without(job.source.headers, {"attempt", "not-before"})
    headers += [("attempt", str(attempt).encode()), ("not-before", str(not_before_ms).encode())]
    return OutRecord(topic, job.id.encode(), job.source.value, headers)


def dlq_record(topic: str, source: Source, reason: DlqReason, detail: str) -> OutRecord:
    """The original bytes and headers plus the DLQ headers."""
    drop = {"dlq-reason", "dlq-detail", "source-topic", "source-partition", "source-offset"}
    headers = _without(source.headers, drop)
    headers += [
        ("dlq-reason", reason.value.encode()),
        ("dlq-detail", detail.encode()),
        ("source-topic", source.topic.encode()),
        ("source-partition", str(source.partition).encode()),
        ("source-offset", str(source.offset).encode()),
    ]
    key = None
    return OutRecord(topic, key, source.value, headers)
