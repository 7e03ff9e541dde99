"""Per-tenant series stay bounded, and counters stay monotonic when a tenant gets a name."""

from __future__ import annotations

from gateway.collectors import PoolCollector
from gateway.metrics import OTHER, Metrics, TenantLabels
from gateway.pools import PoolFigures
from gateway.scheduler import TenantLimits

LIMITS = TenantLimits(1, 1.0, 1, 1, 1)


def figures(tenant: str, started: int = 0, running: int = 0) -> PoolFigures:
    return PoolFigures(tenant, 0, running, 0, 0, started, 0, started, False, LIMITS)


def scrape(collector: PoolCollector, name: str) -> dict[str, float]:
    for family in collector.collect():
        if family.name == name:
            return {
                s.labels.get("tenant", ""): s.value
                for s in family.samples
                if s.name.endswith(("_total", name))
            }
    raise AssertionError(name)


def test_only_the_first_tenants_get_series_of_their_own() -> None:
    labels = TenantLabels(2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]
    assert labels.named("a")
    assert not labels.named("c")


def test_ten_thousand_tenants_are_a_bounded_number_of_series() -> None:
    pools = [figures(f"t{n}", started=n % 3, running=1) for n in range(10_000)]
    collector = PoolCollector(lambda: pools, list, TenantLabels(100))
    running = scrape(collector, "gateway_tenant_running")
    assert len(running) == 101
    assert sum(running.values()) == 10_000


def test_counters_stay_monotonic_when_a_tenant_is_named_later() -> None:
    labels = TenantLabels(1)
    state = {"a": 5, "b": 7}
    collector = PoolCollector(
        lambda: [figures(t, started=n) for t, n in state.items()], list, labels
    )
    first = scrape(collector, "gateway_tenant_started")
    assert first == {"a": 5, OTHER: 7}
    state["b"] = 9
    labels._named.clear()  # "a" restarts idle; b is now the one with a name
    labels("b")
    second = scrape(collector, "gateway_tenant_started")
    assert second[OTHER] >= first[OTHER]
    assert sum(second.values()) == 5 + 9


def test_metrics_labels_go_through_the_cap() -> None:
    metrics = Metrics(max_tenant_series=1)
    metrics.jobs.labels(metrics.tenant("a"), "echo", "succeeded").inc()
    metrics.jobs.labels(metrics.tenant("b"), "echo", "succeeded").inc()
    text = metrics.render().decode()
    assert 'tenant="a"' in text
    assert 'tenant="other"' in text
    assert 'tenant="b"' not in text
