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

from gateway.pools import PoolFigures
from gateway.vault import VaultStats

__all__ = ["LagFigure", "PoolCollector", "VaultCollector"]


@dataclass(frozen=True, slots=True)
class LagFigure:
    """Records of one partition not yet committed: log end minus the commit point."""

    topic: str
    partition: int
    lag: int


class PoolCollector(Collector):
    """Per-tenant running/queued/deferred gauges and throttled/started/completed counters,
    plus consumer lag per assigned partition."""

    def __init__(
        self,
        pools: Callable[[], Iterable[PoolFigures]],
        lag: Callable[[], Iterable[LagFigure]],
    ) -> None:
        self._pools = pools
        self._lag = lag

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "gateway_tenant_running", "Jobs of the tenant running now.", labels=["tenant"]
        )
        queued = GaugeMetricFamily(
            "gateway_tenant_queued",
            "Jobs of the tenant buffered in memory, waiting for a slot or a token.",
            labels=["tenant"],
        )
        deferred = GaugeMetricFamily(
            "gateway_tenant_deferred",
            "Jobs of the tenant parked in jobs.deferred (overflow), not yet back.",
            labels=["tenant"],
        )
        throttled = CounterMetricFamily(
            "gateway_tenant_throttled",
            "Job starts the tenant's token bucket held back (rate limit).",
            labels=["tenant"],
        )
        started = CounterMetricFamily(
            "gateway_tenant_started", "Jobs of the tenant started.", labels=["tenant"]
        )
        completed = CounterMetricFamily(
            "gateway_tenant_completed",
            "Jobs of the tenant that left their slot (any outcome).",
            labels=["tenant"],
        )
        paused = GaugeMetricFamily(
            "gateway_tenant_paused",
            "1 while the tenant is paused by an operator (it starts no new job).",
            labels=["tenant"],
        )
        for figures in self._pools():
            labels = [figures.tenant]
            running.add_metric(labels, figures.running)
            queued.add_metric(labels, figures.queued)
            deferred.add_metric(labels, figures.deferred)
            throttled.add_metric(labels, figures.throttled)
            started.add_metric(labels, figures.started)
            completed.add_metric(labels, figures.completed)
            paused.add_metric(labels, 1.0 if figures.paused else 0.0)
        yield from (running, queued, deferred, throttled, started, completed, paused)
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
