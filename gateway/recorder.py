"""The recorder: where every step of a job's path becomes output records.

Whatever happens to a record (it runs and ends, is retried, deferred, cancelled,
rejected, found to be a duplicate, or its handling fails unexpectedly), the recorder
builds the contract's records for it (`gateway.outcomes`), posts them to the one
outbox, and once the broker has them finishes the record's offset ticket(s) so the
partition can commit past it (invariant 4). It is also the one place that remembers
terminal jobs (idempotency), counts job metrics and writes the job log lines.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

from gateway.audit import audit_tenant_violation
from gateway.catalog import Catalog
from gateway.entry import Entry
from gateway.envelope import DlqReason, Rejection, Source
from gateway.history import TerminalHistory
from gateway.metrics import Metrics
from gateway.observability import job_log
from gateway.offsets import OffsetTracker, Ticket
from gateway.outbox import Outbox
from gateway.outcomes import (
    cancelled_records,
    decide,
    deferral_records,
    internal_error_records,
    rejection_records,
)
from gateway.records import JobStatus, OutRecord, Status, rfc3339, status_record
from gateway.runner import Outcome
from gateway.settings import Settings

__all__ = ["Recorder", "ResultHandler"]

log = logging.getLogger("gateway.jobs")

# Told of each result this replica has published, once the broker has it.
ResultHandler = Callable[[bytes, JobStatus], None]


class Recorder:
    """Builds, sends and accounts for every output record of the job process."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Callable[[], Catalog],
        outbox: Outbox,
        tracker: OffsetTracker,
        history: TerminalHistory,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._topics = settings.topics
        self._max_bytes = settings.kafka.max_request_bytes
        self._catalog = catalog
        self._outbox = outbox
        self._tracker = tracker
        self._history = history
        self._metrics = metrics
        self._rng = random.Random()  # noqa: S311  # backoff jitter, not a secret
        self.on_result: ResultHandler | None = None
        # Attempts whose outcome the broker has (results, retries, dead letters).
        self.completed = 0

    # -- a job that ran ----------------------------------------------------------

    def started(self, entry: Entry, at: float) -> None:
        """The job's `running` transition (nobody waits for its acknowledgement)."""
        job = entry.job
        record = status_record(
            self._topics.status,
            tenant=job.tenant,
            job_id=job.id,
            status=Status.RUNNING,
            attempt=job.attempt,
            at=at,
        )
        self._outbox.post([record], tenant=job.tenant)

    def finished(self, entry: Entry, outcome: Outcome, *, started: float, finished: float) -> None:
        """An attempt ended: its result, retry or dead letter, then its tickets."""
        job = entry.job
        decision = decide(
            job,
            outcome,
            tenant=self._catalog().get(job.tenant),
            topics=self._topics,
            retry=self._settings.retry,
            started_at=started,
            finished_at=finished,
            rng=self._rng,
            max_bytes=self._max_bytes,
            max_delay_s=self._settings.max_delay_s,
        )
        if decision.terminal:
            self._history.remember(job.key, decision.status)
        if outcome.error_code == "tenant_violation":
            audit_tenant_violation(
                tenant=job.tenant, job_id=job.id, job_type=job.type, attempt=job.attempt
            )
        job_log(
            log,
            logging.INFO,
            "job_finished",
            job,
            outcome=decision.status.value,
            duration_ms=round((finished - started) * 1000, 3),
            error=decision.error_code,
        )
        metrics = self._metrics
        if metrics is not None:
            tenant = metrics.tenant(job.tenant)
            metrics.jobs.labels(tenant, job.type, decision.status.value).inc()
            metrics.job_duration.labels(tenant, job.type).observe(finished - started)
            if decision.status is Status.RETRYING:
                metrics.retries.labels(tenant, metrics.error_code(decision.error_code)).inc()
            if any(record.topic == self._topics.dlq for record in decision.records):
                metrics.dlq.labels(DlqReason.MAX_ATTEMPTS_EXCEEDED.value).inc()
        result = self._result_of(decision.records) if decision.terminal else None
        status = JobStatus(job.tenant, job.id, decision.status, job.attempt, rfc3339(finished))
        self._post(
            decision.records, entry.tickets, job.tenant, lambda: self._published(result, status)
        )

    def _result_of(self, records: Sequence[OutRecord]) -> bytes | None:
        return next((r.value for r in records if r.topic == self._topics.results), None)

    def _published(self, result: bytes | None, status: JobStatus) -> None:
        self.completed += 1
        if result is not None and self.on_result is not None:
            self.on_result(result, status)

    # -- records that never ran ----------------------------------------------------

    def rejected(self, rejection: Rejection, ticket: Ticket) -> None:
        """A record that breaks the contract: DLQ (and `rejected` when tenant and id are
        known)."""
        log.info(
            "job_rejected",
            extra={
                "reason": rejection.reason.value,
                "tenant": rejection.tenant,
                "job_id": rejection.job_id,
                "topic": rejection.source.topic,
                "partition": rejection.source.partition,
                "offset": rejection.source.offset,
            },
        )
        if self._metrics is not None:
            self._metrics.dlq.labels(rejection.reason.value).inc()
        if rejection.tenant and rejection.job_id:
            self._history.remember((rejection.tenant, rejection.job_id), Status.REJECTED)
        at = time.time()
        records = rejection_records(
            rejection, topics=self._topics, at=at, max_bytes=self._max_bytes
        )
        self._post(records, [ticket], rejection.tenant or "")

    def failed(self, source: Source, tickets: Sequence[Ticket], error: BaseException) -> None:
        """Handling one record failed unexpectedly: it goes to the DLQ as
        `internal_error` and the intake goes on."""
        # The type only: the text of an unexpected error can carry the record's data.
        name = type(error).__name__
        log.error(
            "record_failed",
            extra={
                "error": name,
                "topic": source.topic,
                "partition": source.partition,
                "offset": source.offset,
            },
        )
        if self._metrics is not None:
            self._metrics.dlq.labels(DlqReason.INTERNAL_ERROR.value).inc()
        try:
            records = internal_error_records(
                source, name, topics=self._topics, max_bytes=self._max_bytes
            )
        except Exception as exc:  # noqa: BLE001  # the record itself is unusable: drop its copy
            log.error("record_dropped", extra={"error": type(exc).__name__})
            records = internal_error_records(
                Source(source.topic, source.partition, source.offset, None, (), 0),
                name,
                topics=self._topics,
                max_bytes=self._max_bytes,
            )
        self._post(records, tickets, "")

    def deferred(self, entry: Entry, delay_s: float) -> None:
        """Overflow past the tenant's buffer: a copy to `jobs.deferred`, due in `delay_s`."""
        job = entry.job
        now = time.time()
        delay_s = min(delay_s, self._settings.max_delay_s)
        if self._metrics is not None:
            self._metrics.deferrals.labels(self._metrics.tenant(job.tenant)).inc()
        records = deferral_records(
            job, topics=self._topics, at=now, not_before_ms=int((now + delay_s) * 1000)
        )
        job_log(log, logging.DEBUG, "job_deferred", job, delay_s=round(delay_s, 3))
        self._post(records, entry.tickets, job.tenant)

    def cancelled(self, entries: Sequence[Entry], where: str) -> None:
        """A job cancelled before it started (`where`: queued, delayed, on_arrival)."""
        job = entries[0].job
        records = cancelled_records(job, topics=self._topics, at=time.time())
        self._history.remember(job.key, Status.CANCELLED)
        job_log(log, logging.INFO, "job_cancelled", job, where=where)
        if self._metrics is not None:
            tenant = self._metrics.tenant(job.tenant)
            self._metrics.jobs.labels(tenant, job.type, Status.CANCELLED.value).inc()
        self._post(records, [t for entry in entries for t in entry.tickets], job.tenant)

    def duplicate(self, entry: Entry) -> None:
        """A redelivery of a job that already ended: nothing to write, the record is done."""
        job_log(log, logging.INFO, "duplicate_skipped", entry.job)
        self._finish(entry.tickets)

    # -- plumbing ----------------------------------------------------------------

    def _post(
        self,
        records: Sequence[OutRecord],
        tickets: Sequence[Ticket],
        tenant: str,
        then: Callable[[], None] | None = None,
    ) -> None:
        def done() -> None:
            self._finish(tickets)
            if then is not None:
                then()

        self._outbox.post(records, done, tenant=tenant)

    def _finish(self, tickets: Sequence[Ticket]) -> None:
        finish = self._tracker.finish
        for ticket in tickets:
            finish(ticket)
