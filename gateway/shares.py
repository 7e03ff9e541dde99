"""Cluster-wide quotas: each replica's share of a tenant's quota follows the tenant's work.

A tenant's quota (concurrency, rate, burst) is the whole cluster's, whatever the number
of replicas and however the tenant's records are keyed (invariant 9). Every replica
publishes its demand per tenant (jobs waiting to start, jobs running, starts since the
last report) every `interval_s` on `jobs.control`, reads everyone else's, and takes

- a share of the tenant's **rate and burst** in proportion to its waiting jobs (where
  there is a backlog to start), and
- a share of the tenant's **concurrency** in proportion to its waiting plus running
  jobs,

among the replicas that reported in the last `peer_timeout_s` (a replica that stops
reporting drops out). A replica with demand gets at least `floor` of the quota, so work
that just arrived can start before the next round of reports; a tenant nobody is
waiting on splits evenly. A single replica, or one that hears from no peer, gets the
whole quota. Pure: no clock, no I/O; the caller passes the time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Demand", "ShareBook", "Shares"]


@dataclass(frozen=True, slots=True)
class Demand:
    """One replica's load of one tenant."""

    waiting: int
    running: int
    started: int = 0


@dataclass(frozen=True, slots=True)
class Shares:
    """This replica's fractions of one tenant's quota."""

    rate: float
    concurrency: float


_WHOLE = Shares(1.0, 1.0)


class ShareBook:
    """The latest demand report of every peer, and this replica's shares from them."""

    def __init__(self, replica: str, *, peer_timeout_s: float, floor: float) -> None:
        self.replica = replica
        self._timeout = peer_timeout_s
        self._floor = floor
        # peer -> (reported at, {tenant: demand})
        self._peers: dict[str, tuple[float, Mapping[str, Demand]]] = {}

    def observe(self, replica: str, at: float, demand: Mapping[str, Demand]) -> None:
        """A peer's report (this replica's own reports are ignored: it knows better)."""
        if replica == self.replica:
            return
        known = self._peers.get(replica)
        if known is None or at >= known[0]:
            self._peers[replica] = (at, demand)

    def peers(self, now: float) -> list[str]:
        """Peers heard from within the timeout (the others have dropped out)."""
        return sorted(r for r, (at, _) in self._peers.items() if now - at <= self._timeout)

    def forget_stale(self, now: float) -> None:
        """Drop peers that stopped reporting."""
        for replica in [r for r, (at, _) in self._peers.items() if now - at > self._timeout]:
            del self._peers[replica]

    def active(self, now: float) -> set[str]:
        """Tenants some live peer has demand for."""
        return {
            tenant
            for at, demand in self._peers.values()
            if now - at <= self._timeout
            for tenant in demand
        }

    def even(self, now: float) -> Shares:
        """The share of a tenant nobody has demand for: an even split."""
        replicas = len(self.peers(now)) + 1
        return Shares(1.0 / replicas, 1.0 / replicas)

    def shares(
        self, local: Mapping[str, Demand], tenants: Iterable[str], now: float
    ) -> dict[str, Shares]:
        """This replica's shares of every tenant in `tenants`."""
        live = [demand for at, demand in self._peers.values() if now - at <= self._timeout]
        if not live:
            return dict.fromkeys(tenants, _WHOLE)
        replicas = len(live) + 1
        result: dict[str, Shares] = {}
        none = Demand(0, 0)
        for tenant in tenants:
            mine = local.get(tenant, none)
            others = [peer.get(tenant, none) for peer in live]
            rate = _fraction(mine.waiting, sum(d.waiting for d in others), replicas, self._floor)
            concurrency = _fraction(
                mine.waiting + mine.running,
                sum(d.waiting + d.running for d in others),
                replicas,
                self._floor,
            )
            result[tenant] = Shares(rate, concurrency)
        return result


def _fraction(mine: int, theirs: int, replicas: int, floor: float) -> float:
    total = mine + theirs
    if total == 0:
        return 1.0 / replicas
    if mine == 0:
        return 0.0 if theirs else 1.0 / replicas
    return max(floor, mine / total)
