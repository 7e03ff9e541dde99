"""The API process's view of `jobs.status` and `jobs.results`: the latest status per job
and the result record of terminal jobs, for `GET /v1/jobs/{id}` on any replica.

Both are bounded and fair between tenants (`gateway.tenantcache`): statuses by count
(`GATEWAY_HISTORY_SIZE`), results by bytes (`GATEWAY_HTTP__RESULT_CACHE_BYTES`). When
full, the tenant holding the most loses its least recently used entry, so one
tenant's 200,000 submissions never make another tenant's live job answer 404.
"""

from __future__ import annotations

import logging

from gateway.records import TERMINAL, JobStatus, parse_result, parse_status
from gateway.settings import Settings
from gateway.tasks import Supervisor
from gateway.tenantcache import TenantCache
from gateway.topicreader import Batches, TopicReader

__all__ = ["StatusView"]

log = logging.getLogger("gateway.status")


class StatusView:
    """Reads `jobs.status` and `jobs.results` from the beginning, with no group, into
    bounded memory. Used on one event loop (the API process's); nothing here is shared
    between threads."""

    def __init__(self, settings: Settings, *, supervisor: Supervisor) -> None:
        topics = settings.topics
        self._results_topic = topics.results
        self._latest: TenantCache[JobStatus] = TenantCache(settings.history_size, index_ids=True)
        cache_bytes = settings.http.result_cache_bytes
        self._results: TenantCache[bytes] | None = (
            TenantCache(cache_bytes, sizeof=len) if cache_bytes > 0 else None
        )
        self._reader = TopicReader(
            settings.kafka,
            [topics.status, topics.results],
            name="status",
            handle=self._apply,
            max_records=2000,
            logger=log,
            supervisor=supervisor,
        )
        self.caught_up = self._reader.caught_up

    def get(self, key: tuple[str, str]) -> JobStatus | None:
        """Latest status of (tenant, job id), if seen."""
        return self._latest.get(key)

    def unfinished(self, tenant: str) -> int:
        """How many of the tenant's jobs this view knows that are not terminal."""
        return sum(1 for s in self._latest.values_of(tenant) if s.status not in TERMINAL)

    def owners(self, job_id: str) -> frozenset[str]:
        """The tenants with a job of this id (for auditing cross-tenant attempts)."""
        return self._latest.owners(job_id)

    def observe(self, status: JobStatus) -> None:
        """Apply one transition (read back, or handed over by this replica's gateway)."""
        key = (status.tenant, status.job_id)
        current = self._latest.peek(key)
        if current is not None and current.status in TERMINAL and status.status not in TERMINAL:
            return
        self._latest.put(key, status)

    def result(self, key: tuple[str, str]) -> bytes | None:
        """The `jobs.results` record value of (tenant, job id), while it is cached."""
        return self._results.get(key) if self._results is not None else None

    def observe_result(self, value: bytes | None, status: JobStatus | None = None) -> None:
        """Keep a terminal result record and apply its status; a caller that already
        knows the status (this replica's own outcomes) passes it to skip parsing."""
        parsed = status if status is not None else parse_result(value)
        if parsed is None or value is None:
            return
        if self._results is not None:
            self._results.put((parsed.tenant, parsed.job_id), value)
        self.observe(parsed)

    async def start(self) -> None:
        """Assign every partition of the topics and begin reading from the start."""
        await self._reader.start()

    async def stop(self) -> None:
        """Stop reading; idempotent."""
        await self._reader.stop()

    def _apply(self, batches: Batches) -> None:
        for tp, records in batches.items():
            if tp.topic == self._results_topic:
                for record in records:
                    self.observe_result(record.value)
                continue
            for record in records:
                parsed = parse_status(record.value)
                if parsed is not None:
                    self.observe(parsed)
