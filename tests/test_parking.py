"""Parking's bookkeeping: what is parked, for whom, and what a revocation forgets.

Reading parked records back runs against a real broker in tests/test_pools.py (a flood
parked and read back; aged records spilled to jobs.deferred) and tests/test_reliability.py
(a crash and a rebalance with records parked).
"""

from __future__ import annotations

from pathlib import Path

from aiokafka import TopicPartition

from gateway.catalog import Catalog, load_catalog
from gateway.offsets import OffsetTracker
from gateway.parking import Parking
from gateway.settings import KafkaSettings, ParkingSettings
from gateway.tasks import Supervisor

from conftest import ROOT, quota_tenant

P0 = TopicPartition("jobs", 0)
P1 = TopicPartition("jobs", 1)


def _catalog(tmp_path: Path) -> Catalog:
    tenants = tmp_path / "tenants"
    tenants.mkdir(parents=True)
    for tenant in ("busy", "calm"):
        (tenants / f"{tenant}.toml").write_text(
            quota_tenant(tenant, conc=1, rate=10, burst=1, queued=8)
        )
    return load_catalog(tenants, ROOT / "policies")


def _parking(
    tmp_path: Path,
    room: dict[str, int],
    max_records: int = 100,
    paused: frozenset[str] = frozenset(),
) -> tuple[Parking, OffsetTracker]:
    catalog = _catalog(tmp_path)
    tracker = OffsetTracker()
    parking = Parking(
        kafka=KafkaSettings(),
        settings=ParkingSettings(max_records=max_records),
        catalog=lambda: catalog,
        tracker=tracker,
        room=lambda tenant: room.get(tenant, 0),
        paused=lambda tenant: tenant in paused,
        supervisor=Supervisor(),
    )
    return parking, tracker


def test_a_tenant_is_parked_when_full_and_stays_parked_until_its_line_is_read(
    tmp_path: Path,
) -> None:
    room = {"busy": 0, "calm": 5}
    parking, tracker = _parking(tmp_path, room)
    assert parking.wants("busy")
    assert not parking.wants("calm")
    assert not parking.wants("stranger")  # unknown: parsed, and dead-lettered
    parking.park("busy", tracker.track(P0, 0, 50), P0)
    room["busy"] = 3
    # Room again, but its parked jobs come first: new ones park behind them.
    assert parking.wants("busy")
    assert parking.counts() == {"busy": 1}
    assert tracker.in_flight_bytes(P0) == 0
    assert tracker.commit_point(P0) == 0


def test_parking_has_a_bound_past_which_overflow_is_deferred(tmp_path: Path) -> None:
    parking, tracker = _parking(tmp_path, {}, max_records=3)
    for offset in range(3):
        assert parking.wants("busy")
        parking.park("busy", tracker.track(P0, offset), P0)
    assert not parking.can_park()
    assert not parking.wants("busy")
    disabled, _ = _parking(tmp_path / "off", {}, max_records=0)
    assert not disabled.wants("busy")


def test_a_revocation_forgets_only_that_partitions_records(tmp_path: Path) -> None:
    parking, tracker = _parking(tmp_path, {})
    for offset in range(4):
        parking.park("busy", tracker.track(P0, offset), P0)
        parking.park("calm", tracker.track(P1, offset), P1)
    parking.park("busy", tracker.track(P1, 4), P1)
    parking.revoke({P0})
    assert parking.counts() == {"busy": 1, "calm": 4}
    assert parking.total == 5
    parking.revoke({P1})
    assert parking.counts() == {}
    assert parking.total == 0


def test_a_paused_tenants_jobs_are_deferred_not_parked(tmp_path: Path) -> None:
    # Deferred at once, so their status says `deferred` while the tenant is paused.
    parking, _ = _parking(tmp_path, {"busy": 0}, paused=frozenset({"busy"}))
    assert not parking.wants("busy")
