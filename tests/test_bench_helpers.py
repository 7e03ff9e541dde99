"""The benchmark's own arithmetic (cheap; the benchmarks themselves never run in tests)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bench.common import epoch_s, max_overlap, percentile

intervals = st.lists(
    st.tuples(st.integers(0, 1000), st.integers(0, 50)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=40,
)


@given(intervals)
def test_max_overlap_matches_counting_at_every_start(spans: list[tuple[int, int]]) -> None:
    # A job finishing at t has released its slot when another starts at t.
    expected = max((sum(1 for s, f in spans if s <= t < f) for t, _ in spans), default=0)
    assert max_overlap([(float(s), float(f)) for s, f in spans]) == expected


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0


def test_epoch_of_a_result_stamp() -> None:
    assert epoch_s("1970-01-01T00:00:01.250Z") == 1.25
