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
reporting drops out). A replica with demand gets at least `floor` of the rate, so work
that just arrived can start before the next round of reports, taken from the others in
proportion so that the shares still add up to the quota; its concurrency comes as whole
slots, at least one, apportioned by largest remainders, which every replica computes
alike from the same reports. A tenant nobody is waiting on splits evenly. A single
replica, or one that hears from no peer, gets the whole quota. Pure: no clock, no I/O;
the caller passes the time.
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
    """This replica's fractions of one tenant's quota, and its whole number of slots
    when they were apportioned (None: derive them from `concurrency`)."""

    rate: float
    concurrency: float
    slots: int | None = None


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

    def cluster(self, local: Mapping[str, Demand], now: float) -> dict[str, Demand]:
        """Per tenant, this replica's demand and that of every peer heard from within
        the timeout, added up: where the cluster's work is, a report late."""
        totals: dict[str, Demand] = {}
        live = [demand for at, demand in self._peers.values() if now - at <= self._timeout]
        for demand in (local, *live):
            for tenant, one in demand.items():
                seen = totals.get(tenant, Demand(0, 0))
                totals[tenant] = Demand(
                    seen.waiting + one.waiting, seen.running + one.running, seen.started
                )
        return totals

    def shares(
        self,
        local: Mapping[str, Demand],
        tenants: Iterable[str],
        now: float,
        *,
        slots: Mapping[str, int] | None = None,
    ) -> dict[str, Shares]:
        """This replica's shares of every tenant in `tenants`; with `slots` (a tenant's
        `max_concurrency`), also its whole number of slots, apportioned the same way on
        every replica so that they add up to the quota (see `_apportion`)."""
        peers = {
            replica: demand
            for replica, (at, demand) in self._peers.items()
            if now - at <= self._timeout
        }
        if not peers:
            return dict.fromkeys(tenants, _WHOLE)
        replicas = len(peers) + 1
        result: dict[str, Shares] = {}
        none = Demand(0, 0)
        for tenant in tenants:
            mine = local.get(tenant, none)
            waiting = {self.replica: mine.waiting}
            load = {self.replica: mine.waiting + mine.running}
            for replica, demand in peers.items():
                theirs = demand.get(tenant, none)
                waiting[replica] = theirs.waiting
                load[replica] = theirs.waiting + theirs.running
            rate = self._fraction(waiting, replicas)
            concurrency = self._fraction(load, replicas)
            own_slots = None
            cap = slots.get(tenant) if slots is not None else None
            if cap is not None and load[self.replica] > 0:
                own_slots = max(1, _apportion(load, cap).get(self.replica, 0))
            result[tenant] = Shares(rate, concurrency, own_slots)
        return result

    def _fraction(self, demand: Mapping[str, int], replicas: int) -> float:
        """This replica's fraction of a quota split by `demand` (floored, summing to 1)."""
        if not any(demand.values()):
            return 1.0 / replicas  # nobody is waiting: an even split
        return _with_floor(demand, self._floor).get(self.replica, 0.0)


def _with_floor(weights: Mapping[str, int], floor: float) -> dict[str, float]:
    """Fractions in proportion to the positive weights, each at least `floor`, summing to
    1: the replicas held at the floor take it from the others in proportion."""
    active = {replica: weight for replica, weight in weights.items() if weight > 0}
    if floor * len(active) >= 1.0:
        return dict.fromkeys(active, 1.0 / len(active))
    fixed: set[str] = set()
    while True:
        rest = {r: w for r, w in active.items() if r not in fixed}
        mass = 1.0 - floor * len(fixed)
        total = sum(rest.values())
        fractions = {r: mass * w / total for r, w in rest.items()}
        low = {r for r, fraction in fractions.items() if fraction < floor}
        if not low:
            return {**dict.fromkeys(fixed, floor), **fractions}
        fixed |= low


def _apportion(weights: Mapping[str, int], total: int) -> dict[str, int]:
    """`total` whole slots over the replicas with positive weight, in proportion, each at
    least one while there are enough (largest remainders; ties to the larger weight, then
    the name), so every replica computing it from the same reports gets the same split."""
    active = {replica: weight for replica, weight in weights.items() if weight > 0}
    if not active or total <= 0:
        return {}
    ideal = {r: f * total for r, f in _with_floor(active, 1.0 / total).items()}
    whole = {r: int(value) for r, value in ideal.items()}
    order = sorted(active, key=lambda r: (-(ideal[r] - whole[r]), -active[r], r))
    for replica in order[: total - sum(whole.values())]:
        whole[replica] += 1
    return whole
