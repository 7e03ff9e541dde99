"""The job process's view of finished jobs: enough to recognise a redelivered job that
already ended, and nothing more.

It reads `jobs.results` (one record per finished job) rather than `jobs.status` (every
transition: queued, deferred, running, retrying...), and only the `tenant`, `job-id` and
`status` headers the contract puts on each result, so a burst's thousands of `deferred`
statuses cost this process nothing. This replica's own outcomes are remembered by the
recorder as they are decided; statuses and result records for `GET` are the API
process's `StatusView`.
"""

from __future__ import annotations

import logging

from gateway.history import TerminalHistory
from gateway.records import TERMINAL, parse_result
from gateway.settings import KafkaSettings
from gateway.tasks import Supervisor
from gateway.topicreader import Batches, TopicReader

__all__ = ["FinishedJobs"]

log = logging.getLogger("gateway.finished")

_TERMINAL = {status.value.encode(): status for status in TERMINAL}  # header bytes -> status


class FinishedJobs:
    """Feeds the terminal history from `jobs.results` (read from the start, no group)."""

    def __init__(
        self,
        settings: KafkaSettings,
        results_topic: str,
        history: TerminalHistory,
        supervisor: Supervisor,
    ) -> None:
        self._history = history
        self._reader = TopicReader(
            settings,
            [results_topic],
            name="finished",
            handle=self._apply,
            max_records=2000,
            logger=log,
            supervisor=supervisor,
        )
        self.caught_up = self._reader.caught_up

    async def start(self) -> None:
        """Assign every partition of `jobs.results` and begin reading from the start."""
        await self._reader.start()

    async def stop(self) -> None:
        """Stop reading; idempotent."""
        await self._reader.stop()

    def _apply(self, batches: Batches) -> None:
        remember = self._history.remember
        for records in batches.values():
            for record in records:
                headers = dict(record.headers or ())
                if not headers.keys() & {"tenant", "job-id", "status"}:
                    # Written without the contract's headers: read its body instead.
                    parsed = parse_result(record.value)
                    if parsed is not None:
                        remember((parsed.tenant, parsed.job_id), parsed.status)
                    continue
                status = _TERMINAL.get(headers.get("status") or b"")
                try:
                    tenant = (headers.get("tenant") or b"").decode()
                    job_id = (headers.get("job-id") or b"").decode()
                except UnicodeDecodeError:
                    continue
                if tenant and job_id and status is not None:
                    remember((tenant, job_id), status)
