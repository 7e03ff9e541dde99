"""The extra workers of `gateway run --workers N`, seen from the gateway process (worker 0).

Workers 1 to N-1 are `python -m gateway.worker` children kept running by
`gateway.child`: one that dies is started again with backoff (`worker_exited`,
`worker_restarted`, `gateway_worker_restarts_total{worker}`), and the consumer group
hands its partitions to the others meanwhile. Each is a replica of its own to the
cluster (`<replica>-w<index>`), so the quota shares (`gateway.shares`) split every
tenant's quota between them by demand as between machines.

At SIGTERM every worker drains side by side with the gateway process, and none commits
and leaves the group before all have drained (`drained`): a member that left early
would have the group take the others' partitions away mid-drain, cutting their
running jobs' grace short.

The gateway process answers its API process for the whole machine: readiness names
each worker that is not ready and why, `/metrics` carries every worker's series under a
`worker` label, and the tenant figures are summed (`gateway.worker.combine`). Workers
are asked all at once and each for at most `CALL_TIMEOUT_S`: one that does not answer
is reported (`worker_not_answering`, `gateway_worker_up` 0, a readiness reason), never
waited on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from gateway.api.channel import ResultReady
from gateway.child import Child
from gateway.metrics import Metrics
from gateway.records import JobStatus
from gateway.settings import Settings
from gateway.tasks import Supervisor, first_of
from gateway.worker.channel import Drained, Leave, Reload, WorkerInit, codec
from gateway.worker.combine import label_workers, render, sum_tenant_figures, worker_families

__all__ = ["CALL_TIMEOUT_S", "Workers", "worker_settings"]

log = logging.getLogger("gateway.workers")

# Bound on one question to one worker (the API process waits 10 s for the answer).
CALL_TIMEOUT_S = 2.0
# A worker's start (Vault login, broker, catching up, joining the group) is bounded by
# its own start-up timeouts plus this; past it the worker is taken for hung.
_START_SLACK_S = 120.0

OnResult = Callable[[bytes, JobStatus], None]


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: a replica name of its own, no listeners, no workers."""
    return settings.model_copy(
        update={
            "replica": f"{settings.replica}-w{index}",
            "workers": 1,
            "http": settings.http.model_copy(update={"enabled": False}),
            "ops": settings.ops.model_copy(update={"enabled": False}),
        }
    )


class Workers:
    """Workers 1 to `settings.workers - 1`: start, ask, reload, stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        stop_bound_s: float,
        supervisor: Supervisor,
        on_result: OnResult | None = None,
    ) -> None:
        self._on_result = on_result
        # A worker drains within its grace and the outbox's produce timeout.
        self._drain_bound_s = settings.shutdown_grace_s + settings.kafka.produce_timeout_s
        self._drained: dict[int, asyncio.Event] = {}
        start_s = settings.vault.startup_timeout_s + settings.kafka.startup_timeout_s
        self._children = {
            index: Child(
                f"worker {index}",
                "worker",
                "gateway.worker",
                codec=codec(),
                channel_name="worker",
                greeting=partial(WorkerInit, worker_settings(settings, index), index),
                on_message=partial(self._on_message, index),
                tasks=supervisor,
                logger=log,
                start_timeout_s=start_s + _START_SLACK_S,
                # A worker ends itself within this bound; a little more for its exit.
                stop_timeout_s=stop_bound_s + 5.0,
                fields={"worker": index},
            )
            for index in range(1, settings.workers)
        }

    def start(self) -> None:
        """Start every worker in the background (each is then kept running)."""
        for child in self._children.values():
            child.start_soon()

    def reload(self) -> None:
        """Ask every worker to read the catalog again."""
        for child in self._children.values():
            if child.channel is not None:
                child.channel.send(Reload())

    def request_stop(self) -> None:
        """Ask every worker to drain and exit (they do so side by side); none restarts."""
        for index, child in self._children.items():
            if child.pid is not None:
                self._drained.setdefault(index, asyncio.Event())
            child.request_stop()

    async def drained(self) -> None:
        """Wait, bounded, until every worker asked to stop has drained (or exited), then
        tell them all to commit and leave the group."""

        await asyncio.gather(
            *(
                first_of(self._drain_bound_s, drained.wait(), self._children[index].wait())
                for index, drained in self._drained.items()
            )
        )
        for child in self._children.values():
            if child.channel is not None:
                child.channel.send(Leave())

    async def stop(self) -> bool:
        """Stop every worker, bounded (then killed); whether each that ran exited 0."""
        codes = await asyncio.gather(*(child.stop() for child in self._children.values()))
        return all(code in (0, None) for code in codes)

    def kill(self) -> None:
        """SIGKILL every worker now (the gateway process is exiting at once)."""
        for child in self._children.values():
            child.kill()

    async def readiness(self, own: Sequence[str]) -> list[str]:
        """Why the machine is not ready: the gateway process's reasons (`own`) and each
        worker's, each naming its worker."""
        answers = await self._ask_all("ready")
        reasons = [f"worker 0: {reason}" for reason in own]
        for index, child in self._children.items():
            answer = answers[index]
            problem = child.problem()
            if problem is not None:
                reasons.append(f"worker {index}: {problem}")
            elif not isinstance(answer, list):
                reasons.append(f"worker {index}: no answer within {CALL_TIMEOUT_S:g}s")
            else:
                reasons.extend(f"worker {index}: {reason}" for reason in answer)
        return reasons

    async def render_metrics(self, own: Metrics) -> bytes:
        """The machine's metrics: every worker's series under a `worker` label."""
        answers = await self._ask_all("metrics")
        families = {0: own.families()}
        families.update((i, a) for i, a in answers.items() if isinstance(a, list))
        up = {0: True, **{i: isinstance(a, list) for i, a in answers.items()}}
        restarts = {index: child.restarts for index, child in self._children.items()}
        return render(label_workers(families) + worker_families(up, restarts))

    async def tenant_figures(self, own: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each tenant's figures summed over the workers (those that answered)."""
        answers = await self._ask_all("tenants")
        tables = [own, *(a for a in answers.values() if isinstance(a, list))]
        return sum_tenant_figures(tables)

    async def _ask_all(self, op: str) -> dict[int, Any]:
        """Every worker's answer to `op`, None from one that is down or did not answer."""
        indexes = list(self._children)
        answers = await asyncio.gather(*(self._ask(index, op) for index in indexes))
        return dict(zip(indexes, answers, strict=True))

    async def _ask(self, index: int, op: str) -> Any:
        child = self._children[index]
        channel = child.channel
        if not child.up or channel is None:
            return None
        try:
            return await channel.call(op, CALL_TIMEOUT_S)
        except (ConnectionError, TimeoutError) as exc:
            log.warning(
                "worker_not_answering",
                extra={"worker": index, "op": op, "error": type(exc).__name__},
            )
            return None

    def _on_message(self, index: int, message: object) -> None:
        if isinstance(message, ResultReady):
            if self._on_result is not None:
                self._on_result(message.value, message.status)
        elif isinstance(message, Drained) and index in self._drained:
            self._drained[index].set()
