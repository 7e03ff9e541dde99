"""Prometheus collectors that read live state at scrape time (no bookkeeping per job).

Per-tenant pool figures, consumer lag per partition and the Vault session's counters
are already kept by the components that own them; these collectors only turn them
into metric families when `/metrics` is scraped. Labels are bounded: tenants come
from the catalog, partitions from the assignment, never job ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.loadguard import SlotGuard
from gateway.metrics import OTHER, TenantLabels
from gateway.pools import PoolFigures
from gateway.vault import VaultStats

__all__ = [
    "BrokerCollector",
    "LagFigure",
    "LoopGuardCollector",
    "PoolCollector",
    "VaultCollector",
]


@dataclass(frozen=True, slots=True)
class LagFigure:
    """Records of one partition not yet committed: log end minus the commit point."""

    topic: str
    partition: int
    lag: int


class PoolCollector(Collector):
    """Per-tenant running/queued/deferred/paused gauges and throttled/started/completed
    counters, plus consumer lag per assigned partition.

    Tenants beyond the named ones (`TenantLabels`) are summed under `tenant="other"`.
    A tenant that gets its own series later keeps what it counted before in `other`
    (its counters' values at that moment stay there as an offset), so every counter
    series only ever grows.
    """

    def __init__(
        self,
        pools: Callable[[], Iterable[PoolFigures]],
        lag: Callable[[], Iterable[LagFigure]],
        labels: TenantLabels,
    ) -> None:
        self._pools = pools
        self._lag = lag
        self._labels = labels
        # tenant -> (started, throttled, completed) left in `other` when it was named
        self._offsets: dict[str, tuple[int, int, int]] = {}
        self._under_other: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "running": GaugeMetricFamily(
                "gateway_tenant_running", "Jobs of the tenant running now.", labels=["tenant"]
            ),
            "queued": GaugeMetricFamily(
                "gateway_tenant_queued",
                "Jobs of the tenant buffered in memory, waiting for a slot or a token.",
                labels=["tenant"],
            ),
            "deferred": GaugeMetricFamily(
                "gateway_tenant_deferred",
                "Jobs of the tenant sent around jobs.deferred (overflow, pause), not yet back.",
                labels=["tenant"],
            ),
            "parked": GaugeMetricFamily(
                "gateway_tenant_parked",
                "Jobs of the tenant left in place on jobs (overflow), to be read again.",
                labels=["tenant"],
            ),
            "paused": GaugeMetricFamily(
                "gateway_tenant_paused",
                "1 while the tenant is paused by an operator (it starts no new job).",
                labels=["tenant"],
            ),
            "throttled": CounterMetricFamily(
                "gateway_tenant_throttled",
                "Job starts the tenant's token bucket held back (rate limit).",
                labels=["tenant"],
            ),
            "started": CounterMetricFamily(
                "gateway_tenant_started", "Jobs of the tenant started.", labels=["tenant"]
            ),
            "completed": CounterMetricFamily(
                "gateway_tenant_completed",
                "Jobs of the tenant that left their slot (any outcome).",
                labels=["tenant"],
            ),
        }
        totals: dict[str, dict[str, float]] = {}

        def row(label: str) -> dict[str, float]:
            return totals.setdefault(label, dict.fromkeys(families, 0.0))

        labels = self._labels
        for figures in self._pools():
            tenant = figures.tenant
            counters = (figures.started, figures.throttled, figures.completed)
            busy = (
                figures.running
                or figures.queued
                or figures.deferred
                or figures.parked
                or figures.paused
            )
            if busy or any(counters):
                label = labels(tenant)
            else:
                label = tenant if labels.named(tenant) else OTHER
            base = (0, 0, 0)
            if label == OTHER:
                self._under_other.add(tenant)
            else:
                if tenant not in self._offsets:
                    self._offsets[tenant] = counters if tenant in self._under_other else base
                base = self._offsets[tenant]
            mine = row(label)
            mine["running"] += figures.running
            mine["queued"] += figures.queued
            mine["deferred"] += figures.deferred
            mine["parked"] += figures.parked
            mine["paused"] = max(mine["paused"], 1.0 if figures.paused else 0.0)
            for name, value, left in zip(
                ("started", "throttled", "completed"), counters, base, strict=True
            ):
                mine[name] += value - left
                if left:
                    row(OTHER)[name] += left
        for label, values in sorted(totals.items()):
            for name, family in families.items():
                family.add_metric([label], values[name])
        yield from families.values()
        lag = GaugeMetricFamily(
            "gateway_consumer_lag",
            "Records of an assigned partition past the committed offset.",
            labels=["topic", "partition"],
        )
        for figure in self._lag():
            lag.add_metric([figure.topic, str(figure.partition)], figure.lag)
        yield lag


class VaultCollector(Collector):
    """The Vault session's calls, cache effectiveness and outage state."""

    def __init__(self, stats: Callable[[], tuple[VaultStats, bool] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        current = self._stats()
        if current is None:
            return
        stats, available = current
        calls = CounterMetricFamily(
            "gateway_vault_calls",
            "Calls to Vault by kind (read, mint, renew, login) that got an answer.",
            labels=["kind"],
        )
        calls.add_metric(["read"], stats.reads)
        calls.add_metric(["mint"], stats.tokens_minted)
        calls.add_metric(["renew"], stats.token_renewals)
        calls.add_metric(["login"], stats.logins)
        yield calls
        failures = CounterMetricFamily(
            "gateway_vault_failures", "Vault calls that failed (unreachable, 5xx, timeout)."
        )
        failures.add_metric([], stats.failures)
        yield failures
        lookups = CounterMetricFamily(
            "gateway_vault_cache_lookups",
            "Secret lookups by how they were answered.",
            labels=["result"],
        )
        lookups.add_metric(["hit"], stats.cache_hits)
        lookups.add_metric(["miss"], stats.cache_misses)
        lookups.add_metric(["coalesced"], stats.cache_coalesced)
        lookups.add_metric(["stale"], stats.stale_served)
        yield lookups
        ratio = GaugeMetricFamily(
            "gateway_vault_cache_hit_ratio",
            "Share of secret lookups that needed no Vault read of their own.",
        )
        ratio.add_metric([], stats.hit_ratio)
        yield ratio
        forbidden = CounterMetricFamily(
            "gateway_vault_forbidden", "Secret reads Vault refused for the tenant's token (403)."
        )
        forbidden.add_metric([], stats.forbidden)
        yield forbidden
        up = GaugeMetricFamily(
            "gateway_vault_up", "1 when Vault answered the last call, 0 during an outage."
        )
        up.add_metric([], 1.0 if available else 0.0)
        yield up


class LoopGuardCollector(Collector):
    """The event loop's smoothed lag and the cap on running jobs it sets
    (`gateway.loadguard`)."""

    def __init__(self, guard: SlotGuard) -> None:
        self._guard = guard

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "gateway_event_loop_lag_seconds",
            "How late a timer fires on the job process's event loop (smoothed).",
        )
        lag.add_metric([], self._guard.lag_s)
        yield lag
        slots = GaugeMetricFamily(
            "gateway_job_slots",
            "Jobs this process may run at once: max_inflight, less while its loop is saturated.",
        )
        slots.add_metric([], float(self._guard.limit))
        yield slots
        pace = GaugeMetricFamily(
            "gateway_job_start_pace",
            "Jobs of backlogged tenants this process may start a second while its loop "
            "stays saturated with too few jobs running to cut (0: not paced).",
        )
        pace.add_metric([], self._guard.rate or 0.0)
        yield pace


class BrokerCollector(Collector):
    """`gateway_broker_up`: 1 while the broker acknowledges this replica's writes."""

    def __init__(self, up: Callable[[], bool]) -> None:
        self._up = up

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "gateway_broker_up", "1 while the broker acknowledges writes, 0 during an outage."
        )
        up.add_metric([], 1.0 if self._up() else 0.0)
        yield up
