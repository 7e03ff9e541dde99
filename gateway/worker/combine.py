"""One machine's figures from its workers' answers: metrics and the admin API's tenant table.

Metrics: one scrape must not hold the same series twice, and every worker counts the
same families (`gateway_jobs_total{tenant,type,outcome}` and so on). So each family
appears once, with every worker's series in it under a `worker` label ("0" is the
gateway process). A label rather than a sum: gauges such as `gateway_broker_up` or
`gateway_vault_cache_hit_ratio` do not add up, and a query that does not care
aggregates the label away (`sum by (tenant)`, `max`, `min`), as the dashboards and
alerts in deploy/ already do across replicas. `gateway_worker_up` (the worker answered
this scrape) and `gateway_worker_restarts_total` come with them.

Tenant figures: one row per tenant, running, queued, deferred, parked, throttled and
backlog summed over the workers; a tenant is paused if any worker holds it paused (they
apply the same `jobs.control` record, a fetch apart).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["label_workers", "render", "sum_tenant_figures", "worker_families"]

_WORKER = "worker"
# The tenant table's columns that add up across workers.
_SUMMED = ("running", "queued", "deferred", "parked", "throttled", "backlog")


def label_workers(families: Mapping[int, Iterable[Metric]]) -> list[Metric]:
    """Every family once, holding each worker's samples with a `worker` label added.

    A family whose type differs from the first worker's (a mismatched build) keeps
    only the samples of the type it was first seen with.
    """
    merged: dict[str, Metric] = {}
    for worker, answered in sorted(families.items()):
        label = str(worker)
        for family in answered:
            into = merged.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = into
            elif into.type != family.type:
                continue
            into.samples.extend(
                sample._replace(labels={**sample.labels, _WORKER: label})
                for sample in family.samples
            )
    return list(merged.values())


def worker_families(up: Mapping[int, bool], restarts: Mapping[int, int]) -> list[Metric]:
    """`gateway_worker_up{worker}` and `gateway_worker_restarts_total{worker}`."""
    answered = GaugeMetricFamily(
        "gateway_worker_up",
        "1 when the worker answered this scrape (its series are in it), else 0.",
        labels=[_WORKER],
    )
    for worker, value in sorted(up.items()):
        answered.add_metric([str(worker)], 1.0 if value else 0.0)
    restarted = CounterMetricFamily(
        "gateway_worker_restarts",
        "Times the worker process exited and was started again.",
        labels=[_WORKER],
    )
    for worker, count in sorted(restarts.items()):
        restarted.add_metric([str(worker)], count)
    return [answered, restarted]


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def render(families: Sequence[Metric]) -> bytes:
    """Families in the Prometheus text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def sum_tenant_figures(tables: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per tenant of the first table (the gateway process's: its catalog, in
    its order), with the counts (running, queued, deferred, parked, throttled, backlog) added
    up over every table."""
    if not tables:
        return []
    rows = [dict(row) for row in tables[0]]
    by_tenant = {row["tenant"]: row for row in rows}
    for table in tables[1:]:
        for other in table:
            row = by_tenant.get(other.get("tenant"))
            if row is None:  # a tenant only a worker knows (a catalog reload between them)
                continue
            for column in _SUMMED:
                row[column] = row.get(column, 0) + other.get(column, 0)
            if other.get("state") == "paused":
                row["state"] = "paused"
    return rows
