"""Prometheus metrics of one gateway, in a registry the gateway owns (not the global one).

Add a metric as an attribute of `Metrics`, created with `registry=self.registry`;
`GET /metrics` renders the whole registry.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric of one gateway replica."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # `tenant` is the caller; the owner of the job is never a label (invariant 3).
        self.cross_tenant_denials = Counter(
            "gateway_cross_tenant_denials",
            "Requests for another tenant's job, answered as if the job did not exist.",
            ["tenant", "action"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
