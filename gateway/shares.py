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
replica, or one that hears from no peer, gets the whole quota.

Every replica computes from its own demand now and its peers' as last reported, so
when demand moves (after a rebalance every replica's buffers refill at once) each one
briefly sees its own new backlog beside its peers' old, empty ones, and all of them
would take most of the quota until the next reports arrive. With `hold_s` a share
therefore falls at once but rises only once the higher figure has held for `hold_s`
(long enough for the peers to hear this replica's report and answer it): a share is
the least this replica computed over the last `hold_s`, a tenant that just became busy
starting from the even split it had. Work that just arrived still gets the floor.
Pure: no clock, no I/O; the caller passes the time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Demand", "ShareBook", "Shares", "rise_hold_s", "slots_of"]


def rise_hold_s(demand_interval_s: float, fetch_max_wait_s: float) -> float:
    """How long a share's rise is held back: this replica's report reaches the peers
    within a fetch wait of the round that computed the rise, and each of them answers
    it within one round of its own; one round more for the rounds' timers to drift."""
    return 2 * demand_interval_s + fetch_max_wait_s


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
_IDLE = Demand(0, 0)


def slots_of(share: Shares, cap: int) -> int:
    """This replica's whole number of slots of a concurrency quota of `cap`: the ones
    apportioned, else its fraction of them, at least one (so work can start)."""
    return share.slots if share.slots is not None else max(1, round(cap * share.concurrency))


def _with_slots(share: Shares, cap: int | None) -> Shares:
    """`share` with its whole number of slots of a quota of `cap` filled in."""
    if cap is None or share.slots is not None:
        return share
    return Shares(share.rate, share.concurrency, slots_of(share, cap))


class ShareBook:
    """The latest demand report of every peer, and this replica's shares from them."""

    def __init__(
        self, replica: str, *, peer_timeout_s: float, floor: float, hold_s: float = 0.0
    ) -> None:
        self.replica = replica
        self._timeout = peer_timeout_s
        self._floor = floor
        self._hold_s = hold_s
        # peer -> (reported at, {tenant: demand})
        self._peers: dict[str, tuple[float, Mapping[str, Demand]]] = {}
        # tenant -> the shares computed within the last `hold_s` (and the one in force
        # when it began), oldest first; tenants with demand now or within `hold_s`
        self._recent: dict[str, deque[tuple[float, Shares]]] = {}

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
        every replica so that they add up to the quota (see `_apportion`). With
        `hold_s`, rises are held back (see the module's docstring), and a tenant that
        left `tenants` within the last `hold_s` is listed too, until its even split
        has held."""
        computed = self._computed(local, tenants, now, slots)
        if self._hold_s <= 0:
            return computed
        return self._held(computed, local, now, slots or {})

    def _computed(
        self,
        local: Mapping[str, Demand],
        tenants: Iterable[str],
        now: float,
        slots: Mapping[str, int] | None,
    ) -> dict[str, Shares]:
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

    def _held(
        self,
        computed: Mapping[str, Shares],
        local: Mapping[str, Demand],
        now: float,
        caps: Mapping[str, int],
    ) -> dict[str, Shares]:
        """Each tenant's least shares over the last `hold_s`; at least the floor of its
        rate while it has work waiting here."""
        even = self.even(now)
        horizon = now - self._hold_s
        held: dict[str, Shares] = {}
        for tenant in {*computed, *self._recent}:
            cap = caps.get(tenant)
            fair = _with_slots(even, cap)
            share = _with_slots(computed.get(tenant, even), cap)
            recent = self._recent.get(tenant)
            if recent is None:
                recent = self._recent[tenant] = deque([(now, fair)])  # what it had
            recent.append((now, share))
            while len(recent) > 1 and recent[1][0] <= horizon:
                recent.popleft()  # superseded before the window began
            if tenant not in computed and all(s == fair for _, s in recent):
                del self._recent[tenant]  # idle, and even for all of the window
                continue
            rate = min(s.rate for _, s in recent)
            if local.get(tenant, _IDLE).waiting > 0:
                rate = max(rate, min(share.rate, self._floor))  # work that just arrived
            slots = [s.slots for _, s in recent if s.slots is not None]
            held[tenant] = Shares(
                rate,
                min(s.concurrency for _, s in recent),
                min(slots) if slots else None,
            )
        return held

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
