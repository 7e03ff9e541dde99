"""Prometheus metrics of one gateway, in a registry the gateway owns (not the global one).

Event metrics (jobs, retries, DLQ, durations, commits, denials) are counted where they
happen; state (pools, lag, Vault) is read at scrape time by `gateway.collectors`.
Every label is bounded: job types come from the registry, DLQ reasons from the
contract, free-form error codes and node names are capped (`_Bounded`), and tenants are
capped too (`TenantLabels`): the first `max_tenant_series` tenants to be active get a
series of their own, for as long as the process lives, and every other tenant is
counted under `tenant="other"`, so 10,000 tenants never make 10,000 series per metric.
Job ids never become labels.
"""

from __future__ import annotations

import re

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "OTHER", "Metrics", "TenantLabels"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_NODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)
_COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class _Bounded:
    """Free-form label values (error codes, node names from user flows), capped in number."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return "none"
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value):
            return "other"
        self._seen.add(value)
        return value


OTHER = "other"


class TenantLabels:
    """The `tenant` label of a tenant: its own id for the first `limit` tenants seen
    (sticky: a tenant never moves between series), `other` for the rest."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._named: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self._named:
            return tenant
        if len(self._named) < self._limit and tenant != OTHER:
            self._named.add(tenant)
            return tenant
        return OTHER

    def named(self, tenant: str) -> bool:
        """Whether the tenant has a series of its own already (never assigns one)."""
        return tenant in self._named


class Metrics:
    """Every metric of one gateway replica."""

    def __init__(self, max_tenant_series: int = 200) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        # `tenant` is the caller; the owner of the job is never a label (invariant 3).
        self.cross_tenant_denials = Counter(
            "gateway_cross_tenant_denials",
            "Requests for another tenant's job, answered as if the job did not exist.",
            ["tenant", "action"],
            registry=registry,
        )
        self.jobs = Counter(
            "gateway_jobs",
            "Job attempts by how they ended (retrying: another attempt is scheduled).",
            ["tenant", "type", "outcome"],
            registry=registry,
        )
        self.job_duration = Histogram(
            "gateway_job_duration_seconds",
            "Time from an attempt's start to its outcome being recorded.",
            ["tenant", "type"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self.node_latency = Histogram(
            "gateway_node_latency_seconds",
            "PenguiFlow node invocation latency, from FlowEvents.",
            ["tenant", "node"],
            buckets=_NODE_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "gateway_retries",
            "Attempts sent to jobs.retry, by the error that ended them.",
            ["tenant", "reason"],
            registry=registry,
        )
        self.dlq = Counter(
            "gateway_dlq",
            "Records written to jobs.dlq, by contract reason.",
            ["reason"],
            registry=registry,
        )
        self.deferrals = Counter(
            "gateway_deferrals",
            "Records sent to jobs.deferred because the tenant's buffer was full.",
            ["tenant"],
            registry=registry,
        )
        self.commit_duration = Histogram(
            "gateway_commit_duration_seconds",
            "Offset commit round trips.",
            buckets=_COMMIT_BUCKETS,
            registry=registry,
        )
        self.commit_failures = Counter(
            "gateway_commit_failures", "Offset commits the broker refused.", registry=registry
        )
        self.api_process_restarts = Counter(
            "gateway_api_process_restarts",
            "Times the API process exited and was started again.",
            registry=registry,
        )
        self.error_code = _Bounded(100)
        self.node_name = _Bounded(200)
        self.tenant = TenantLabels(max_tenant_series)

    def add_collector(self, collector: Collector) -> None:
        """Register a scrape-time collector (pools, lag, Vault)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def families(self) -> list[Metric]:
        """The registry's metric families as of now (what a worker hands over)."""
        return list(self.registry.collect())
