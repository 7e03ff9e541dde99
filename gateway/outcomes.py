"""Pure decision of what an attempt's outcome publishes: result, retry or dead letter."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from gateway.catalog import Tenant
from gateway.envelope import DlqReason, Job, Rejection
from gateway.flows import Outcome
from gateway.records import (
    OutRecord,
    Status,
    delayed_record,
    dlq_record,
    result_record,
    status_record,
)
from gateway.retries import backoff_s, max_attempts
from gateway.settings import RetrySettings, TopicSettings

__all__ = ["Decision", "cancelled_records", "decide", "rejection_records"]


@dataclass(frozen=True, slots=True)
class Decision:
    """Records to publish (acknowledged before the offset is finished) and the final status."""

    records: list[OutRecord]
    status: Status
    terminal: bool


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
) -> Decision:
    """Map one attempt's outcome to the records the contract asks for."""

    def final(status: Status) -> list[OutRecord]:
        return _terminal(
            topics,
            tenant=job.tenant,
            job_id=job.id,
            job_type=job.type,
            status=status,
            result=outcome.result,
            error=outcome.error,
            attempts=job.attempt,
            started_at=started_at,
            finished_at=finished_at,
        )

    if not outcome.retryable or outcome.status in (Status.SUCCEEDED, Status.CANCELLED):
        return Decision(final(outcome.status), outcome.status, terminal=True)

    limit = max_attempts(job, tenant, retry)
    if job.attempt < limit or not outcome.counts_attempt:
        # A failure that is not the job's own (Vault outage) retries on the same attempt.
        next_attempt = job.attempt + 1 if outcome.counts_attempt else job.attempt
        delay = outcome.retry_after_s
        if delay is None:
            delay = backoff_s(job.attempt, retry, rng)
        not_before_ms = int((finished_at + delay) * 1000)
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
        return Decision(records, Status.RETRYING, terminal=False)

    detail = f"{job.attempt} attempts, last error {outcome.error_code}"
    records = final(outcome.status)
    records.append(dlq_record(topics.dlq, job.source, DlqReason.MAX_ATTEMPTS_EXCEEDED, detail))
    return Decision(records, outcome.status, terminal=True)


def rejection_records(rejection: Rejection, *, topics: TopicSettings, at: float) -> list[OutRecord]:
    """DLQ record, plus a `rejected` result and status when tenant and id are known."""
    records = [dlq_record(topics.dlq, rejection.source, rejection.reason, rejection.detail)]
    if rejection.tenant and rejection.job_id:
        records += _terminal(
            topics,
            tenant=rejection.tenant,
            job_id=rejection.job_id,
            job_type=rejection.job_type,
            status=Status.REJECTED,
            result=None,
            error=(rejection.reason.value, rejection.detail),
            attempts=0,
            started_at=at,
            finished_at=at,
        )
    return records


def cancelled_records(job: Job, *, topics: TopicSettings, at: float) -> list[OutRecord]:
    """Result and status `cancelled` for a job cancelled before it ever started."""
    return _terminal(
        topics,
        tenant=job.tenant,
        job_id=job.id,
        job_type=job.type,
        status=Status.CANCELLED,
        result=None,
        error=("cancelled", "cancelled on request before it started"),
        attempts=job.attempt,
        started_at=at,
        finished_at=at,
    )


def _terminal(
    topics: TopicSettings,
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
) -> list[OutRecord]:
    """The result record and the matching terminal status record of one job."""
    return [
        result_record(
            topics.results,
            tenant=tenant,
            job_id=job_id,
            job_type=job_type,
            status=status,
            result=result,
            error=error,
            attempts=attempts,
            started_at=started_at,
            finished_at=finished_at,
        ),
        status_record(
            topics.status,
            tenant=tenant,
            job_id=job_id,
            status=status,
            attempt=attempts,
            at=finished_at,
        ),
    ]
