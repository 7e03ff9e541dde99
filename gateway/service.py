"""The gateway process: wiring, start order and the one written-down shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from gateway.admission import Admission
from gateway.api.supervisor import ApiProcess
from gateway.catalog import Catalog, CatalogLoader
from gateway.collectors import (
    BrokerCollector,
    LoopGuardCollector,
    PoolCollector,
    VaultCollector,
)
from gateway.control import (
    CancelAllCommand,
    CancelCommand,
    Command,
    ControlListener,
    DemandReport,
    PauseCommand,
    PendingCancels,
)
from gateway.errors import ConfigError, GatewayError, ReplicaFenced
from gateway.finished import FinishedJobs
from gateway.flows import JobTypes, load_job_types
from gateway.health import BrokerHealth, LoopWatch
from gateway.history import TerminalHistory
from gateway.intake import Intake
from gateway.metrics import Metrics
from gateway.offsets import OffsetTracker
from gateway.outbox import Outbox
from gateway.pools import PoolFigures, Pools, limits_for
from gateway.process import make_undumpable, tune_gc
from gateway.recorder import Recorder
from gateway.records import admin_record
from gateway.reload import CatalogReloader
from gateway.runner import Runner
from gateway.settings import KafkaSettings, Settings, TopicSettings
from gateway.shares import Demand, ShareBook, rise_hold_s
from gateway.tasks import Supervisor, cancel_and_wait
from gateway.vault import SecretStore, VaultStats
from gateway.worker.pool import Workers

__all__ = [
    "Gateway",
    "ReadinessCheck",
    "ensure_topics",
    "run_gateway",
    "serve",
    "shutdown_bound_s",
    "tune_gc",
]

log = logging.getLogger("gateway.service")

# Bound on waiting for the status view to read what is already on `jobs.status`
# before taking jobs, so redelivered finished jobs are recognised.
_STATUS_CATCH_UP_S = 30.0
# Bound on one readiness check (GET /readyz).
_READINESS_CHECK_S = 2.0
# Running jobs' grace when the replica stops because something failed.
_FAILED_GRACE_S = 5.0
# A process's whole shutdown ends within its grace, the produce timeout and this.
_SHUTDOWN_SLACK_S = 10.0
# The steps after the outbox's drain that wait on the broker (commit and leave the group,
# close the readers and the producer) share this much time, or this little while the
# broker is unreachable (nothing sent then would be answered): a step past it is
# abandoned, and its work is redelivered as after a crash.
_BROKER_STEPS = frozenset({"commit", "leave", "control", "finished", "outbox"})
_CLOSE_S = 8.0  # within _SHUTDOWN_SLACK_S
_CLOSE_UNREACHABLE_S = 1.0
_CLOSE_STEP_MIN_S = 0.25  # each of them gets at least this, whatever the others took

# A readiness check: None when fine, else a short reason (shown by GET /readyz).
ReadinessCheck = Callable[[], Awaitable[str | None]]


def shutdown_bound_s(settings: Settings) -> float:
    """How long a gateway process's shutdown may take before it exits anyway."""
    return settings.shutdown_grace_s + settings.kafka.produce_timeout_s + _SHUTDOWN_SLACK_S


async def ensure_topics(kafka: KafkaSettings, topics: TopicSettings) -> None:
    """Create any missing contract topic (clusters without auto-create, and Tansu).

    `jobs.control` is compacted: it holds the latest pause, cancel and redrive state of
    each subject, which must outlive any time-based retention. Production clusters
    create topics with deploy/scripts/create_topics.py (replication, retention)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers, request_timeout_ms=kafka.request_timeout_ms
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics.all() if t not in existing]
        if missing:
            compacted = {"cleanup.policy": "compact"}
            await admin.create_topics(
                [
                    NewTopic(
                        name,
                        kafka.partitions,
                        1,
                        topic_configs=compacted if name == topics.control else None,
                    )
                    for name in missing
                ]
            )
            log.info("topics_created", extra={"topics": missing})
    finally:
        await admin.close()


async def wait_for_broker(kafka: KafkaSettings) -> None:
    """Return once the broker answers; retry with backoff for `startup_timeout_s`, then
    raise ConfigError naming the address, the cause and what to change."""
    deadline = time.monotonic() + kafka.startup_timeout_s
    delay, cause = 0.5, "no answer"
    while True:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=kafka.bootstrap_servers,
            request_timeout_ms=min(kafka.request_timeout_ms, 5000),
        )
        try:
            await admin.start()
            await admin.list_topics()
        except (KafkaError, OSError) as exc:
            cause = type(exc).__name__
        else:
            return
        finally:
            with contextlib.suppress(KafkaError, OSError):
                await admin.close()
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConfigError(
                f"the broker at {kafka.bootstrap_servers} is unreachable ({cause}) after "
                f"{kafka.startup_timeout_s:g}s: check GATEWAY_KAFKA__BOOTSTRAP_SERVERS "
                "(or start a local one with `gateway dev up`)"
            )
        log.warning(
            "broker_waiting",
            extra={"broker": kafka.bootstrap_servers, "error": cause, "left_s": round(left)},
        )
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, 5.0)


class Gateway:
    """All components of one replica; `start()` then `wait()`; `stop()` is idempotent.

    A job's path, as built here: intake (the consumer) -> admission (parse, hold,
    deduplicate, defer) -> pools (quotas, fair dispatch) -> runner (the flow) ->
    recorder (every output record, through the one outbox) -> offsets (the tracker the
    intake commits from).

    With `settings.workers` > 1 it is worker 0 of the machine: it also runs and
    supervises the other workers (`gateway.worker`), and answers its API process for
    all of them.
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        job_types: JobTypes | None = None,
        *,
        loader: CatalogLoader | None = None,
    ) -> None:
        self.settings = settings
        self._catalog = catalog
        self.job_types = job_types or load_job_types(settings.flows)
        self.supervisor = Supervisor(self._task_failed)
        self.metrics = Metrics(settings.max_tenant_series)
        self.history = TerminalHistory(settings.history_size)
        self.tracker = OffsetTracker()
        kafka = settings.kafka
        self.broker = BrokerHealth(
            kafka.bootstrap_servers, unreachable_after_s=kafka.unreachable_after_s
        )
        # Slept through the group's session (minus a heartbeat, to be safe): fenced.
        self.loop_watch = LoopWatch((kafka.session_timeout_ms - kafka.heartbeat_interval_ms) / 1000)
        self._watch_task: asyncio.Task[None] | None = None
        self.outbox = Outbox(
            kafka,
            self.supervisor,
            client_id=f"{kafka.client_id}-producer",
            on_fatal=self.fail,
            health=self.broker,
            fence=self.loop_watch.fenced,
        )
        self.secrets = (
            SecretStore(settings.vault, supervisor=self.supervisor)
            if settings.vault.configured
            else None
        )
        self.recorder = Recorder(
            settings=settings,
            catalog=self.catalog,
            outbox=self.outbox,
            tracker=self.tracker,
            history=self.history,
            metrics=self.metrics,
        )
        runner = Runner(
            catalog=self.catalog,
            job_types=self.job_types,
            secrets=self.secrets,
            metrics=self.metrics,
        )
        self.pools = Pools(
            settings=settings,
            catalog=self.catalog,
            runner=runner,
            recorder=self.recorder,
            supervisor=self.supervisor,
        )
        self.pending_cancels = PendingCancels(
            settings.control.max_pending_cancels, settings.control.cancel_ttl_s
        )
        self.admission = Admission(
            settings=settings,
            catalog=self.catalog,
            job_types=self.job_types,
            pools=self.pools,
            recorder=self.recorder,
            history=self.history,
            cancels=self.pending_cancels,
            tracker=self.tracker,
            supervisor=self.supervisor,
        )
        self.intake = Intake(
            settings=settings,
            tracker=self.tracker,
            admission=self.admission,
            recorder=self.recorder,
            pools=self.pools,
            supervisor=self.supervisor,
            metrics=self.metrics,
            fence=self.loop_watch.fenced,
        )
        self.intake.on_assignment(self._on_assignment)
        self.shares = ShareBook(
            settings.replica,
            peer_timeout_s=settings.cluster.peer_timeout_s,
            floor=settings.cluster.share_floor,
            hold_s=rise_hold_s(
                settings.cluster.demand_interval_s, settings.kafka.fetch_max_wait_ms / 1000
            ),
        )
        self._share_task: asyncio.Task[None] | None = None
        # Finished jobs only (the API process keeps the statuses and results for GET).
        self.finished = FinishedJobs(
            settings.kafka, settings.topics.results, self.history, self.supervisor
        )
        self.control = ControlListener(
            settings.kafka,
            settings.topics.control,
            settings.control.cancel_ttl_s,
            self._on_command,
            self.supervisor,
        )
        self.metrics.add_collector(
            PoolCollector(self.pool_figures, self.intake.lag, self.metrics.tenant)
        )
        self.metrics.add_collector(VaultCollector(self._vault_stats))
        self.metrics.add_collector(BrokerCollector(lambda: self.broker.up))
        if self.pools.guard is not None:
            self.metrics.add_collector(LoopGuardCollector(self.pools.guard))
        # Extra conditions for GET /readyz (e.g. Vault reachable or its cache warm).
        self.readiness_checks: list[ReadinessCheck] = []
        if self.secrets is not None:
            self.readiness_checks.append(self._vault_ready)
        self.api: ApiProcess | None = None
        if settings.http.enabled or settings.ops.enabled:
            self.api = ApiProcess(
                settings,
                self.catalog,
                self.job_types,
                answers={
                    "ready": self._readiness,
                    "metrics": self._render_metrics,
                    "tenants": self._tenant_figures,
                },
                metrics=self.metrics,
                supervisor=self.supervisor,
            )
            self.recorder.on_result = self.api.forward_result
        # At shutdown, awaited once this replica has drained, before it commits and
        # leaves the group: the machine's workers leave together (gateway.worker.pool).
        self.before_leaving_group: Callable[[], Awaitable[None]] | None = None
        self.workers: Workers | None = None
        if settings.workers > 1:
            self.workers = Workers(
                settings,
                stop_bound_s=shutdown_bound_s(settings),
                supervisor=self.supervisor,
                on_result=self.api.forward_result if self.api is not None else None,
            )
            self.before_leaving_group = self.workers.drained
        self._assigned_once = False
        self.reloader = CatalogReloader(
            settings.tenants_dir,
            settings.policies_dir,
            self.apply_catalog,
            settings.catalog_poll_s,
            self.supervisor,
            loader,
        )
        self._stopped = asyncio.Event()
        self._stopping = False
        self._failed = False
        self.exit_code = 0
        # Why the start failed, in one line (for the command line).
        self.failure: str | None = None

    def _vault_stats(self) -> tuple[VaultStats, bool] | None:
        store = self.secrets
        return (store.stats, store.available) if store is not None else None

    async def _vault_ready(self) -> str | None:
        store = self.secrets
        if store is None or store.ready:
            return None
        return "vault unreachable and no cached secrets"

    def catalog(self) -> Catalog:
        """The catalog in force now."""
        return self._catalog

    def reload_catalog(self) -> None:
        """Read the catalog again now (SIGHUP), here and in every worker."""
        self.reloader.reload()
        if self.workers is not None:
            self.workers.reload()

    def apply_catalog(self, catalog: Catalog) -> None:
        """Swap the catalog: new limits for new admissions; removed tenants' jobs are DLQ'd."""
        self._catalog = catalog
        self.pools.apply_catalog(catalog)
        if self.api is not None:
            self.api.catalog_changed()

    def _on_command(self, command: Command) -> None:
        if isinstance(command, CancelCommand):
            where = self.admission.cancel(command.key)
            log.info(
                "cancel_received",
                extra={"tenant": command.tenant, "job_id": command.job_id, "where": where},
            )
        elif isinstance(command, PauseCommand):
            if command.paused:
                parked = self.admission.pause(command.tenant)
                log.warning(
                    "tenant_paused",
                    extra={"tenant": command.tenant, "by": command.by, "deferred": parked},
                )
            else:
                self.admission.resume(command.tenant)
                log.warning("tenant_resumed", extra={"tenant": command.tenant, "by": command.by})
        elif isinstance(command, DemandReport):
            self.shares.observe(command.replica, command.at, command.demand)
        elif isinstance(command, CancelAllCommand):
            held = self.admission.cancel_all(command.tenant, command.job_type, command.requested_at)
            log.warning(
                "tenant_jobs_cancelled",
                extra={
                    "tenant": command.tenant,
                    "type": command.job_type,
                    "by": command.by,
                    "held_here": held,
                },
            )

    def pool_figures(self) -> list[PoolFigures]:
        """Per-tenant pool figures of this replica, parked records included."""
        return list(self.pools.snapshot(self.admission.parking.counts()))

    async def tenant_figures(self) -> list[dict[str, object]]:
        """Per tenant of the catalog, as this replica sees it (the admin API's view):
        its own figures, its share of the quota now, and the cluster's waiting and
        running jobs from the replicas' demand reports."""
        pools = {figures.tenant: figures for figures in self.pool_figures()}
        now = time.time()
        local = {f.tenant: Demand(f.queued + f.parked, f.running) for f in pools.values()}
        cluster = self.shares.cluster(local, now)
        replicas = len(self.shares.peers(now)) + 1
        rows: list[dict[str, object]] = []
        for tenant in self._catalog:
            figures = pools.get(tenant.id)
            quota = tenant.quota
            queued = figures.queued if figures else 0
            deferred = figures.deferred if figures else 0
            parked = figures.parked if figures else 0
            queue = self.pools.scheduler.tenant(tenant.id)
            limits = queue.limits if queue is not None else limits_for(tenant)
            everywhere = cluster.get(tenant.id, Demand(0, 0))
            rows.append(
                {
                    "tenant": tenant.id,
                    "state": "paused" if self.pools.paused(tenant.id) else "active",
                    "quota": {
                        "max_concurrency": quota.max_concurrency,
                        "rate_per_s": quota.rate_per_s,
                        "burst": quota.burst,
                        "max_queued": quota.max_queued,
                        "weight": quota.weight,
                    },
                    "running": figures.running if figures else 0,
                    "queued": queued,
                    "deferred": deferred,
                    "parked": parked,
                    "throttled": figures.throttled if figures else 0,
                    "backlog": queued + deferred + parked,
                    "share": {
                        "max_concurrency": limits.max_concurrency,
                        "rate_per_s": round(limits.rate_per_s, 3),
                    },
                    "cluster": {
                        "replicas": replicas,
                        "waiting": everywhere.waiting,
                        "running": everywhere.running,
                    },
                }
            )
        return rows

    @property
    def http_port(self) -> int | None:
        """The port the HTTP API listens on (useful with port 0), or None when disabled."""
        return self.api.port if self.api is not None else None

    @property
    def ops_port(self) -> int | None:
        """The port of the operators' listener, or None when disabled."""
        return self.api.ops_port if self.api is not None else None

    async def _render_metrics(self) -> bytes:
        if self.workers is None:
            return self.metrics.render()
        return await self.workers.render_metrics(self.metrics)

    async def _readiness(self) -> list[str]:
        # What GET /readyz answers: this process's reasons, then every worker's.
        reasons = await self.not_ready_reasons()
        return reasons if self.workers is None else await self.workers.readiness(reasons)

    async def _tenant_figures(self) -> list[dict[str, object]]:
        # The admin API's tenant table: this process's figures, plus every worker's.
        rows = await self.tenant_figures()
        return rows if self.workers is None else await self.workers.tenant_figures(rows)

    async def not_ready_reasons(self) -> list[str]:
        """Why this replica is not ready to serve (empty when it is)."""
        reasons = []
        if self.supervisor.failure is not None:
            reasons.append(f"task failed: {self.supervisor.failure}")
        if self._stopping:
            reasons.append("stopping")
        if self.intake.fetch_problem is not None:
            reasons.append(f"fetching fails: {self.intake.fetch_problem}")
        down = self.broker.down_for()
        if down > self.settings.kafka.not_ready_after_s:
            reasons.append(f"broker unreachable for {down:.0f}s")
        if not self._assigned_once:
            reasons.append("partitions not assigned yet")
        if not self.finished.caught_up.is_set():
            reasons.append("finished jobs catching up")
        if not self.control.caught_up.is_set():
            reasons.append("cancel commands catching up")
        for check in list(self.readiness_checks):
            name = getattr(check, "__name__", "check")
            try:
                reason = await asyncio.wait_for(check(), _READINESS_CHECK_S)
            except TimeoutError:
                reason = f"{name}: no answer within {_READINESS_CHECK_S:g}s"
            except Exception as exc:  # noqa: BLE001  # a failing check means not ready, not a 500
                reason = f"{name}: {type(exc).__name__}"
            if reason is not None:
                reasons.append(reason)
        return reasons

    def _on_assignment(self, assigned: set[Hashable]) -> None:
        self._assigned_once = True

    async def _watch(self) -> None:
        """Every quarter second: notice a stalled loop (fenced), declare broker outages."""
        self.loop_watch.reset()
        while True:
            gap = self.loop_watch.tick()
            if self.loop_watch.fenced():
                self.fail(ReplicaFenced("slept through the consumer-group session"))
            elif gap > 1.0:
                self.broker.skip(gap)  # not an outage: this process was not running
            self.broker.check()
            await asyncio.sleep(0.25)

    async def _share_quotas(self) -> None:
        """Every `demand_interval_s`: report this replica's demand, read the others',
        and take this replica's shares of every tenant's quota (gateway.shares)."""
        cluster = self.settings.cluster
        while True:
            now = time.time()
            local = self.pools.demand(self.admission.parking.counts())
            self._report_demand(now, local)
            book = self.shares
            book.forget_stale(now)
            tenants = self._catalog.tenants
            active = (set(local) | book.active(now)) & set(tenants)
            slots = {t: tenants[t].quota.max_concurrency for t in active}
            self.pools.apply_shares(book.shares(local, active, now, slots=slots), book.even(now))
            await asyncio.sleep(cluster.demand_interval_s)

    def _report_demand(self, now: float, demand: Mapping[str, Demand]) -> None:
        """Tell the other replicas what this one has waiting and running, per tenant."""
        report = admin_record(
            self.settings.topics.control,
            op="demand",
            tenant="-",
            at=now,
            by="gateway",
            replica=self.settings.replica,
            demand={t: [d.waiting, d.running, d.started] for t, d in demand.items()},
        )
        self.outbox.post([report])

    async def _stop_sharing(self) -> None:
        """Stop reporting, and report no demand: a replica that is stopping starts
        nothing more, so the others take its shares now, not a peer timeout later."""
        await self.supervisor.cancel(self._share_task)
        if self._share_task is not None:
            self._report_demand(time.time(), {})

    def fail(self, exc: BaseException) -> None:
        """A fatal error: stop with a non-zero exit; unfinished work is redelivered."""
        if self._failed:
            return
        if isinstance(exc, ReplicaFenced):
            log.error(
                "replica_fenced",
                extra={
                    "stalled_s": round(self.loop_watch.fenced_after or 0.0, 1),
                    "hint": "the process did not run for longer than the session timeout; "
                    "its partitions belong to others now, so it writes and commits nothing "
                    "more and exits (its unfinished work is redelivered to them)",
                },
            )
        else:
            log.error("fatal_error", extra={"error": type(exc).__name__})
        self._failed = True
        self.exit_code = 1
        self.request_stop()

    def _task_failed(self, name: str, why: str) -> None:
        # Logged by the supervisor (task_failed): one of the replica's loops is gone.
        self._failed = True
        self.exit_code = 1
        self.request_stop()

    def request_stop(self) -> None:
        """Ask the service to stop (signal handlers call this)."""
        self._stopped.set()

    async def start(self) -> None:
        """Start order: Vault login, topics, producer, status view and cancel commands,
        HTTP API (not ready yet), both views caught up (bounded), pools, intake."""
        if self.secrets is not None:
            await self.secrets.start()
        elif any(tenant.secret_paths for tenant in self._catalog):
            log.warning("vault_not_configured", extra={"hint": "set GATEWAY_VAULT__TOKEN"})
        await wait_for_broker(self.settings.kafka)
        if self.settings.kafka.create_topics:
            await ensure_topics(self.settings.kafka, self.settings.topics)
        if self.workers is not None:
            # Now, so they join the group about when this process does: one rebalance.
            self.workers.start()
        self._watch_task = self.supervisor.spawn(self._watch(), "gateway:watch")
        await self.outbox.start()
        await self.finished.start()
        await self.control.start()
        if self.api is not None:
            await self.api.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(self.finished.caught_up.wait(), self.control.caught_up.wait()),
                _STATUS_CATCH_UP_S,
            )
        await self.pools.start()
        await self.admission.start()
        self._share_task = self.supervisor.spawn(self._share_quotas(), "gateway:shares")
        await self.intake.start()
        await self.reloader.start()
        log.info(
            "gateway_started",
            extra={
                "replica": self.settings.replica,
                "tenants": len(self._catalog),
                "http_port": self.http_port,
                "ops_port": self.ops_port,
            },
        )

    async def wait(self) -> None:
        """Block until a stop is requested."""
        await self._stopped.wait()

    async def _drain_outbox(self) -> None:
        drain_s = 0.0 if self.outbox.failed else self.settings.kafka.produce_timeout_s
        if not await self.outbox.drain(drain_s):
            log.warning("outbox_not_drained")

    async def stop(self) -> None:
        """Shutdown order, in one place:

        0. ask the workers to stop (each drains and commits as below, side by side with
           this process); stop the HTTP API process (requests under way finish,
           bounded);
        1. stop fetching; held retries/deferrals are dropped, not committed;
        2. stop starting jobs; running ones get `shutdown_grace_s` (at most 5 s after a
           failure), then are cancelled (their records stay uncommitted, redelivered);
        3. wait (bounded by the produce timeout) for the outbox: results, retries,
           deferrals and dead letters already decided; with workers, wait (bounded)
           until every one of them has drained too (`before_leaving_group`), so no
           member leaves the group while another still runs jobs;
        4. commit every finished record and leave the group; only then stop watching
           the loop (a drain may outlast the session timeout: the writers and the
           commit tell a stall from it by the watch's ticks); wait for the workers
           (each ends within its own shutdown bound, else it is killed);
        5. close the cancel listener (it still reached running jobs during the grace),
           the finished-jobs reader and the producer; stop renewing the Vault token;
           end whatever task is left.

        The broker's part of 4 and 5 (commit, leave, close the clients) shares one
        bound, `_CLOSE_S`, or `_CLOSE_UNREACHABLE_S` during an outage; a step past it is
        abandoned, so a SIGTERM during an outage still ends the process soon after the
        grace and the drain. Only an abandoned commit means exit 1 (its finished work
        runs again); leaving the group late (a rebalance under way) or closing a client
        late loses nothing.
        """
        if self._stopping:
            return
        self._stopping = True
        self._stopped.set()
        if self.workers is not None:
            self.workers.request_stop()
        grace = self.settings.shutdown_grace_s
        if self._failed:
            grace = min(grace, _FAILED_GRACE_S)
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if self.api is not None:
            steps.append(("api", self.api.stop))
        steps += [
            ("reloader", self.reloader.stop),
            ("shares", self._stop_sharing),
            ("intake", self.intake.stop_fetching),
            ("admission", self.admission.stop),
            ("pools", lambda: self.pools.stop(grace)),
            ("outbox-drain", self._drain_outbox),
            ("leave-together", self._before_leaving_group),
            ("commit", self.intake.commit),
            ("leave", self.intake.close),
            # Only now: the writers and the commit judge a stalled loop by its ticks.
            ("watch", lambda: self.supervisor.cancel(self._watch_task)),
            ("workers", self._stop_workers),
            ("control", self.control.stop),
            ("finished", self.finished.stop),
            ("outbox", self.outbox.stop),
        ]
        if self.secrets is not None:
            steps.append(("vault", self.secrets.stop))
        steps.append(("tasks", self.supervisor.close))
        loop = asyncio.get_running_loop()
        closing_left: float | None = None  # the broker steps' budget (seconds)
        for name, step in steps:
            bound: float | None = None
            if name in _BROKER_STEPS:
                if closing_left is None:
                    closing_left = _CLOSE_S if self.broker.up else _CLOSE_UNREACHABLE_S
                bound = max(_CLOSE_STEP_MIN_S, closing_left)
            began = loop.time()
            try:
                async with asyncio.timeout(bound):
                    await step()
            except TimeoutError:
                log.warning(
                    "stop_step_abandoned", extra={"step": name, "broker_up": self.broker.up}
                )
                if name == "commit":  # finished work will run again: say so in the exit code
                    self.exit_code = 1
            except Exception as exc:  # noqa: BLE001  # one failed step must not skip the rest
                log.error("stop_step_failed", extra={"step": name, "error": type(exc).__name__})
                self.exit_code = 1
            if bound is not None and closing_left is not None:
                closing_left -= loop.time() - began
        log.info("gateway_stopped", extra={"exit_code": self.exit_code})

    async def _before_leaving_group(self) -> None:
        if self.before_leaving_group is not None:
            await self.before_leaving_group()

    async def _stop_workers(self) -> None:
        if self.workers is not None and not await self.workers.stop():
            self.exit_code = 1  # a worker did not drain cleanly (its worker_stopped line says)

    def abort(self) -> None:
        """The process exits at once (a second signal): the workers end with it."""
        if self.workers is not None:
            self.workers.kill()


def _exit_overdue(bound_s: float) -> None:
    log.error("shutdown_overdue", extra={"after_s": bound_s})
    logging.shutdown()
    os._exit(1)


def dump_tasks() -> None:
    """SIGUSR1: every asyncio task and the chain of awaits it is suspended in, on stderr,
    for an operator asking where a process is stuck (code locations only: no values,
    so no payload or secret)."""
    lines = []
    for task in asyncio.all_tasks():
        lines.append(f"--- task {task.get_name()}")
        awaited: Any = task.get_coro()
        for _ in range(50):
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is None:
                break
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


async def run_gateway(settings: Settings) -> tuple[int, str | None]:
    """`gateway run`: start, serve until SIGTERM/SIGINT, stop in order; a 2nd signal exits.
    With `settings.workers` > 1 this process is worker 0 and runs the others.
    Returns the exit code and, when the start failed, why (one line)."""
    # Before anything holds a secret: the API process (same user) must not be able to
    # read this process's memory or environment.
    make_undumpable()
    loader = CatalogLoader(settings.tenants_dir, settings.policies_dir)
    gateway = Gateway(settings, loader.load(), loader=loader)
    return await serve(gateway, stop_signals=(signal.SIGTERM, signal.SIGINT))


async def serve(
    gateway: Gateway,
    *,
    stop_signals: Sequence[signal.Signals],
    on_started: Callable[[], None] | None = None,
) -> tuple[int, str | None]:
    """Start `gateway`, serve until one of `stop_signals` (or `request_stop`), stop in
    order; a second signal exits at once. `on_started` runs once it has started.
    Returns the exit code and, when the start failed, why (one line)."""
    settings = gateway.settings
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second_signal_exit")
            gateway.abort()
            os._exit(130)
        log.info("shutdown_requested")
        gateway.request_stop()

    for sig in stop_signals:
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_catalog)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    try:
        # Start as a task: a SIGTERM during start-up (joining the group, waiting for the
        # broker) cancels it and goes straight to the shutdown.
        starting = asyncio.create_task(gateway.start(), name="gateway:start")
        stopping = asyncio.create_task(gateway.wait(), name="gateway:wait")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("start_interrupted")
            await cancel_and_wait(starting)
        else:
            starting.result()  # raises what the start raised
            tune_gc(settings)
            if on_started is not None:
                on_started()
            await stopping
        stopping.cancel()
    except GatewayError as exc:
        # One line, no traceback: the message names what is wrong and what to change.
        log.error("start_failed", extra={"error": str(exc)})
        gateway.failure = str(exc)
        gateway.exit_code = 1
    finally:
        # Whatever happens in the shutdown, the process ends within its bound.
        bound = shutdown_bound_s(settings)
        deadline = threading.Timer(bound, _exit_overdue, args=(bound,))
        deadline.daemon = True
        deadline.start()
        await gateway.stop()
        deadline.cancel()
        for sig in (*stop_signals, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
    return gateway.exit_code, gateway.failure
