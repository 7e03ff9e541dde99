"""The per-tenant fair cache: one tenant's volume never evicts another tenant's share."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.control import PendingCancels
from gateway.history import TerminalHistory
from gateway.records import Status
from gateway.tenantcache import TenantCache


def test_a_flood_evicts_only_its_own_entries() -> None:
    cache: TenantCache[int] = TenantCache(100)
    for n in range(10):
        cache.put(("quiet", f"q{n}"), n)
    for n in range(200_000):
        cache.put(("noisy", f"n{n}"), n)
    assert all(("quiet", f"q{n}") in cache for n in range(10))
    assert len(cache) == 100
    assert cache.size_of("noisy") == 90
    # The flood keeps its most recent entries.
    assert ("noisy", "n199999") in cache
    assert ("noisy", "n0") not in cache


def test_alone_a_tenant_may_use_the_whole_bound_until_others_arrive() -> None:
    cache: TenantCache[int] = TenantCache(10)
    for n in range(10):
        cache.put(("a", str(n)), n)
    assert cache.size_of("a") == 10
    cache.put(("b", "1"), 1)
    assert cache.size_of("a") == 9
    assert ("b", "1") in cache


def test_per_tenant_bound_and_weights() -> None:
    cache: TenantCache[bytes] = TenantCache(1000, max_per_tenant=300, sizeof=len)
    for n in range(10):
        cache.put(("a", str(n)), b"x" * 100)
    assert cache.size_of("a") == 300
    assert not cache.put(("a", "huge"), b"x" * 301)  # alone over the per-tenant bound
    assert ("a", "huge") not in cache
    assert cache.total == 300


def test_owners_index_follows_inserts_and_evictions() -> None:
    cache: TenantCache[int] = TenantCache(3, index_ids=True)
    cache.put(("a", "same"), 1)
    cache.put(("b", "same"), 2)
    cache.put(("b", "x"), 3)
    assert cache.owners("same") == {"a", "b"}
    cache.put(("b", "other"), 4)  # b holds the most: its oldest entry goes
    assert cache.owners("same") == {"a"}
    assert cache.pop(("a", "same")) == 1
    assert cache.owners("same") == frozenset()


def test_history_and_pending_cancels_are_fair() -> None:
    history = TerminalHistory(50)
    history.remember(("quiet", "done"), Status.SUCCEEDED)
    for n in range(10_000):
        history.remember(("noisy", str(n)), Status.SUCCEEDED)
    assert history.get(("quiet", "done")) is Status.SUCCEEDED
    cancels = PendingCancels(50, 600.0)
    cancels.add(("quiet", "c1"))
    for n in range(10_000):
        cancels.add(("noisy", str(n)))
    assert ("quiet", "c1") in cancels


@settings(max_examples=300, deadline=None)
@given(
    bound=st.integers(min_value=1, max_value=40),
    ops=st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(min_value=0, max_value=30)), max_size=300
    ),
)
def test_property_bounded_and_fair(bound: int, ops: list[tuple[str, int]]) -> None:
    cache: TenantCache[int] = TenantCache(bound, index_ids=True)
    for tenant, n in ops:
        before = {t: cache.size_of(t) for t in "abcde"}
        holders = [t for t in "abcde" if before[t]]
        average = sum(before.values()) / max(1, len(holders))
        cache.put((tenant, str(n)), n)
        assert len(cache) <= bound
        assert (tenant, str(n)) in cache
        # Another tenant loses an entry only while it holds at least the average: one
        # holding less than an equal share keeps everything, whatever the others do.
        for other in "abcde":
            if other != tenant and cache.size_of(other) < before[other]:
                assert before[other] >= average
    for tenant in "abcde":
        for n in range(31):
            present = (tenant, str(n)) in cache
            assert present == (tenant in cache.owners(str(n)))
