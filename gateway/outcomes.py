"""Pure decision of what an attempt's outcome publishes: result, retry or dead letter.

Every record built here fits `max_bytes` (see `gateway.records`): the decision's status
and error code are those of the records actually written, so a success whose result is
too large is decided as a `failed` job with `result_too_large`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gateway.catalog import Tenant
from gateway.envelope import DlqReason, Job, Rejection, Source
from gateway.records import (
    OutRecord,
    Status,
    delayed_record,
    dlq_record,
    status_record,
    terminal_records,
)
from gateway.retries import backoff_s, max_attempts
from gateway.runner import Outcome
from gateway.settings import RetrySettings, TopicSettings

__all__ = [
    "Decision",
    "cancelled_records",
    "decide",
    "deferral_records",
    "internal_error_records",
    "rejection_records",
]


@dataclass(frozen=True, slots=True)
class Decision:
    """Records to publish (acknowledged before the offset is finished) and the final status."""

    records: list[OutRecord]
    status: Status
    terminal: bool
    error_code: str | None


def decide(
    job: Job,
    outcome: Outcome,
    *,
    tenant: Tenant | None,
    topics: TopicSettings,
    retry: RetrySettings,
    started_at: float,
    finished_at: float,
    rng: random.Random,
    max_bytes: int,
    max_delay_s: float,
) -> Decision:
    """Map one attempt's outcome to the records the contract asks for."""

    def final(status: Status) -> tuple[list[OutRecord], Status, str | None]:
        return terminal_records(
            results_topic=topics.results,
            status_topic=topics.status,
            tenant=job.tenant,
            job_id=job.id,
            job_type=job.type,
            status=status,
            result=outcome.result,
            error=outcome.error,
            attempts=job.attempt,
            started_at=started_at,
            finished_at=finished_at,
            max_bytes=max_bytes,
        )

    if not outcome.retryable or outcome.status in (Status.SUCCEEDED, Status.CANCELLED):
        records, status, code = final(outcome.status)
        return Decision(records, status, terminal=True, error_code=code)

    limit = max_attempts(job, tenant, retry)
    if job.attempt < limit or not outcome.counts_attempt:
        # A failure that is not the job's own (Vault outage) retries on the same attempt.
        next_attempt = job.attempt + 1 if outcome.counts_attempt else job.attempt
        delay = outcome.retry_after_s
        if delay is None:
            delay = backoff_s(job.attempt, retry, rng)
        not_before_ms = int((finished_at + min(delay, max_delay_s)) * 1000)
        records = [
            delayed_record(topics.retry, job, attempt=next_attempt, not_before_ms=not_before_ms),
            status_record(
                topics.status,
                tenant=job.tenant,
                job_id=job.id,
                status=Status.RETRYING,
                attempt=job.attempt,
                at=finished_at,
            ),
        ]
        return Decision(records, Status.RETRYING, terminal=False, error_code=outcome.error_code)

    detail = f"{job.attempt} attempts, last error {outcome.error_code}"
    records, status, code = final(outcome.status)
    records.append(
        dlq_record(
            topics.dlq, job.source, DlqReason.MAX_ATTEMPTS_EXCEEDED, detail, max_bytes=max_bytes
        )
    )
    return Decision(records, status, terminal=True, error_code=code)


def rejection_records(
    rejection: Rejection, *, topics: TopicSettings, at: float, max_bytes: int
) -> list[OutRecord]:
    """DLQ record, plus a `rejected` result and status when tenant and id are known."""
    records = [
        dlq_record(
            topics.dlq, rejection.source, rejection.reason, rejection.detail, max_bytes=max_bytes
        )
    ]
    if rejection.tenant and rejection.job_id:
        terminal, _, _ = terminal_records(
            results_topic=topics.results,
            status_topic=topics.status,
            tenant=rejection.tenant,
            job_id=rejection.job_id,
            job_type=rejection.job_type,
            status=Status.REJECTED,
            result=None,
            error=(rejection.reason.value, rejection.detail),
            attempts=0,
            started_at=at,
            finished_at=at,
            max_bytes=max_bytes,
        )
        records += terminal
    return records


def internal_error_records(
    source: Source, error: str, *, topics: TopicSettings, max_bytes: int
) -> list[OutRecord]:
    """The DLQ record for a record whose handling failed unexpectedly (`internal_error`)."""
    detail = f"unexpected {error} while handling the record"
    return [dlq_record(topics.dlq, source, DlqReason.INTERNAL_ERROR, detail, max_bytes=max_bytes)]


def cancelled_records(job: Job, *, topics: TopicSettings, at: float) -> list[OutRecord]:
    """Result and status `cancelled` for a job cancelled before it ever started."""
    records, _, _ = terminal_records(
        results_topic=topics.results,
        status_topic=topics.status,
        tenant=job.tenant,
        job_id=job.id,
        job_type=job.type,
        status=Status.CANCELLED,
        result=None,
        error=("cancelled", "cancelled on request before it started"),
        attempts=job.attempt,
        started_at=at,
        finished_at=at,
        max_bytes=1 << 30,  # ids and types are bounded: this record is always small
    )
    return records


def deferral_records(
    job: Job, *, topics: TopicSettings, at: float, not_before_ms: int
) -> list[OutRecord]:
    """The job's copy for `jobs.deferred` and its `deferred` status."""
    return [
        delayed_record(topics.deferred, job, attempt=job.attempt, not_before_ms=not_before_ms),
        status_record(
            topics.status,
            tenant=job.tenant,
            job_id=job.id,
            status=Status.DEFERRED,
            attempt=job.attempt,
            at=at,
        ),
    ]
