"""Crash, rebalance, restart and shutdown with real gateway processes on a real broker."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from faults import ProxiedTansu

from gateway.service import ensure_topics, shutdown_bound_s
from gateway.settings import Settings

from conftest import (
    JobClient,
    committed_offsets,
    make_settings,
    quota_tenant,
    read_topic,
    result_ids,
    results_at_least,
    results_by_id,
    wait_all_results,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def crash_and_recover(
    settings: Settings, gateway_process: Any, ids: set[str], progress: int
) -> None:
    """SIGKILL a gateway at a random point once `progress` results are out, start another,
    and check every job got a result, with duplicates only from work in flight at the
    crash (its commits were behind)."""
    first = gateway_process(settings, "first")
    first.start()
    await wait_for(lambda: results_at_least(settings, progress), 60)
    await asyncio.sleep(random.uniform(0.0, 1.5))
    first.signal(signal.SIGKILL)
    first.wait(10)
    second = gateway_process(settings, "second")
    second.start()
    seen = await wait_all_results(settings, ids, 120)
    duplicates = sum(count - 1 for count in seen.values() if count > 1)
    print(f"crash test: {len(ids)} jobs, {duplicates} duplicate results")
    assert duplicates <= settings.max_inflight + settings.kafka.max_poll_records
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0


async def test_sigkill_mid_run_loses_nothing(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    run_settings = settings.model_copy(update={"max_inflight": 64})
    ids = {f"c{n}" for n in range(3000)}
    for n in range(3000):
        await client.job("initech" if n % 2 else "acme", f"c{n}", "sleep", seconds=0.005)
    await client.flush()
    await crash_and_recover(run_settings, gateway_process, ids, progress=200)


def _small_buffers(settings: Settings, tmp_path: Path) -> Settings:
    """`settings` over two tenants whose buffers a burst overflows (it gets parked)."""
    tenants = tmp_path / "small-buffers"
    tenants.mkdir()
    quotas = {
        "burst": {"conc": 8, "rate": 300, "burst": 20, "queued": 20},
        "calm": {"conc": 4, "rate": 50, "burst": 5, "queued": 10},
    }
    for tenant_id, quota in quotas.items():
        (tenants / f"{tenant_id}.toml").write_text(quota_tenant(tenant_id, **quota))
    return settings.model_copy(update={"tenants_dir": tenants})


async def test_sigkill_with_parked_overflow_loses_nothing(
    settings: Settings, client: JobClient, gateway_process: Any, tmp_path: Path
) -> None:
    # Parked records hold their partitions' commits back; killed with thousands parked,
    # the next process reads them again from the committed offsets, and the jobs that
    # had finished meanwhile are recognised (jobs.results), not run again.
    run_settings = _small_buffers(settings, tmp_path)
    ids = {f"b{n}" for n in range(2000)} | {f"c{n}" for n in range(100)}
    for n in range(2000):
        await client.job("burst", f"b{n}", "echo", n=n)
        if n % 20 == 0:
            await client.job("calm", f"c{n // 20}", "echo", n=n)
    await client.flush()
    await crash_and_recover(run_settings, gateway_process, ids, progress=300)


async def test_rebalance_when_a_replica_stops(
    settings: Settings, client: JobClient, gateway_process: Any, tmp_path: Path
) -> None:
    # Small buffers: both replicas hold parked records when one of them leaves.
    settings = _small_buffers(settings, tmp_path)
    one = gateway_process(settings, "one")
    two = gateway_process(settings, "two")
    one.start()
    two.start()
    ids = {f"r{n}" for n in range(800)}
    for n in range(800):
        await client.job("burst" if n % 2 else "calm", f"r{n}", "sleep", seconds=0.01)
    await client.flush()
    await wait_for(lambda: results_at_least(settings, 100), 60)
    two.signal(signal.SIGTERM)
    assert two.wait(40) == 0
    seen = await wait_all_results(settings, ids, 120)
    assert ids <= set(seen)
    one.signal(signal.SIGTERM)
    assert one.wait(30) == 0


async def test_retry_delay_survives_a_restart(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    slow_retry = settings.model_copy(
        update={
            "retry": settings.retry.model_copy(update={"base_s": 4.0, "jitter": 0.0, "cap_s": 4.0})
        }
    )
    first = gateway_process(slow_retry, "first")
    first.start()
    await client.job("acme", "flaky", "fail", retryable=True, succeed_on_attempt=2)
    await client.flush()
    retries = await read_topic(slow_retry, slow_retry.topics.retry, until=1, timeout_s=60)
    not_before = int(dict(retries[0].headers)["not-before"])
    assert dict(retries[0].headers)["attempt"] == b"2"
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    second = gateway_process(slow_retry, "second")
    second.start()
    results = await read_topic(slow_retry, slow_retry.topics.results, until=1, timeout_s=60)
    body = json.loads(results[0].value)
    assert (body["id"], body["status"], body["attempts"]) == ("flaky", "succeeded", 2)
    assert results[0].timestamp >= not_before - 50  # never ran before its not-before
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0


async def test_retries_exhausted_go_to_dlq(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    process = gateway_process(settings)
    process.start()
    await client.send(
        "acme", {"id": "doomed", "type": "fail", "payload": {"retryable": True}, "max_attempts": 2}
    )
    await client.flush()
    results = results_by_id(
        await read_topic(settings, settings.topics.results, until=1, timeout_s=60)
    )
    assert results["doomed"][0]["status"] == "failed"
    assert results["doomed"][0]["attempts"] == 2
    dlq = await read_topic(settings, settings.topics.dlq, until=1, timeout_s=30)
    reasons = {dict(r.headers)["dlq-reason"] for r in dlq}
    assert reasons == {b"max_attempts_exceeded"}
    process.signal(signal.SIGTERM)
    assert process.wait(30) == 0


async def test_deadline_expiry_is_timed_out(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    process = gateway_process(settings)
    process.start()
    await client.send(
        "acme",
        {
            "id": "slow",
            "type": "sleep",
            "payload": {"seconds": 30},
            "deadline_s": 0.5,
            "max_attempts": 1,
        },
    )
    await client.flush()
    started = time.monotonic()
    results = await read_topic(settings, settings.topics.results, until=1, timeout_s=60)
    body = json.loads(results[0].value)
    assert body["status"] == "timed_out"
    assert body["error"]["code"] == "deadline_exceeded"
    assert body["duration_ms"] < 5000
    assert time.monotonic() - started < 30
    process.signal(signal.SIGTERM)
    assert process.wait(30) == 0


async def test_sigterm_with_long_jobs_exits_within_grace_and_loses_nothing(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    grace = settings.model_copy(update={"shutdown_grace_s": 2.0})
    first = gateway_process(grace, "first")
    first.start()
    ids = {f"long{n}" for n in range(10)}
    for n in range(10):
        await client.job("acme", f"long{n}", "sleep", seconds=8)
    await client.flush()
    statuses = await read_topic(grace, grace.topics.status, until=10, timeout_s=60)
    assert len({json.loads(r.value)["id"] for r in statuses}) == 10  # all running
    stopped_at = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    assert time.monotonic() - stopped_at < 2.0 + 8.0
    assert not await result_ids(grace), "cancelled jobs must not be reported as finished"
    second = gateway_process(grace, "second")
    second.start()
    seen = await wait_all_results(grace, ids, 90)
    assert all(seen[i] == 1 for i in ids)
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0


async def test_sigterm_during_a_broker_outage_ends_within_its_bound_and_loses_nothing(
    tmp_path: Path, gateway_process: Any
) -> None:
    """The broker black-holed (connections accepted, never answered) while jobs run:
    SIGTERM still ends the process within its shutdown bound, and what it could not
    write or commit is redone by the next replica once the broker is back."""
    with ProxiedTansu(tmp_path / "tansu.log") as tansu:
        made = make_settings(tansu.bootstrap, shutdown_grace_s=2.0)
        settings = made.model_copy(
            update={"kafka": made.kafka.model_copy(update={"produce_timeout_s": 5.0})}
        )
        await ensure_topics(settings.kafka, settings.topics)
        ids = {f"o{n}" for n in range(600)}
        producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, linger_ms=2)
        await producer.start()
        try:
            client = JobClient(settings, producer)
            for n in range(600):
                await client.job("initech" if n % 2 else "acme", f"o{n}", "sleep", seconds=0.05)
            await client.flush()
        finally:
            await producer.stop()
        first = gateway_process(settings, "first")
        first.start()
        await wait_for(lambda: results_at_least(settings, 50), 60)
        tansu.proxy.blackhole()
        await wait_for(lambda: first.events("broker_unreachable"), 30)
        stopped_at = time.monotonic()
        first.signal(signal.SIGTERM)
        bound = shutdown_bound_s(settings)
        first.wait(bound + 10)
        took = time.monotonic() - stopped_at
        assert took < bound, f"SIGTERM during the outage took {took:.1f} s (bound {bound:g} s)"
        assert first.events("gateway_stopped"), "it was killed, not stopped"
        tansu.proxy.heal()
        second = gateway_process(settings, "second")
        second.start()
        seen = await wait_all_results(settings, ids, 120)
        assert ids <= set(seen)
        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0


async def test_a_replica_that_slept_through_its_session_writes_nothing_and_exits(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    # SIGSTOP for longer than the session timeout: the group drops the replica and its
    # partitions belong to others. On waking, it must not publish what it was running
    # (another replica may have run those jobs): it says so and exits non-zero.
    frozen = gateway_process(settings, "frozen")
    frozen.start()
    ids = {f"z{n}" for n in range(300)}
    for n in range(300):
        await client.job("acme" if n % 2 else "initech", f"z{n}", "sleep", seconds=0.2)
    await client.flush()
    await wait_for(lambda: results_at_least(settings, 20), 60)
    frozen.signal(signal.SIGSTOP)
    await asyncio.sleep(settings.kafka.session_timeout_ms / 1000 + 3)
    stopped_results = len(await read_topic(settings, settings.topics.results, timeout_s=2))
    frozen.signal(signal.SIGCONT)
    assert frozen.wait(30) == 1
    events = [line.get("event") for line in frozen.log_lines()]
    assert "replica_fenced" in events
    # Nothing it was running got out after it woke.
    after = len(await read_topic(settings, settings.topics.results, timeout_s=2))
    assert after == stopped_results
    assert stopped_results < len(ids), "the replica froze with work left (the test's premise)"
    successor = gateway_process(settings, "successor")
    successor.start()
    seen = await wait_all_results(settings, ids, 120)
    assert sum(count - 1 for count in seen.values()) == 0, "a job got two results"
    await wait_for(lambda: _has_event(successor, "gateway_started"), 60)
    successor.signal(signal.SIGTERM)
    assert successor.wait(30) == 0


async def test_a_drain_longer_than_the_session_timeout_still_writes_and_commits(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    # The grace may outlast the session timeout: a job that ends late in the drain is
    # still published and committed, not taken for the work of a replica that slept
    # through its session (the loop watch ticks until the commit).
    kafka = settings.kafka.model_copy(
        update={"session_timeout_ms": 3000, "heartbeat_interval_ms": 300}
    )
    configured = settings.model_copy(update={"kafka": kafka, "shutdown_grace_s": 8.0})
    process = gateway_process(configured, "long-drain")
    process.start()
    ids = {f"d{n}" for n in range(4)}
    for job_id in sorted(ids):
        await client.job("acme", job_id, "sleep", seconds=5)
    await client.flush()
    await read_topic(configured, configured.topics.status, until=4, timeout_s=60)
    process.signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert await result_ids(configured) == dict.fromkeys(ids, 1)
    committed = await committed_offsets(configured, configured.topics.jobs)
    assert sum(offset or 0 for offset in committed.values()) == len(ids)


def _has_event(process: Any, event: str) -> bool:
    return any(line.get("event") == event for line in process.log_lines())
