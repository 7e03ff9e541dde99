"""Issue 4 benchmark: tenant pools on Tansu, every system run as its own process.

Scenarios (choose with --scenario, default all):

noisy     Tenant `flood` bursts 20,000 `sleep` 5 ms jobs; right after, tenant `steady`
          sends `sleep` 5 ms jobs at 10/s for 30 s into the same partitions. Measured:
          steady's produce-to-result latency (send time here to the result's arrival at
          a consumer here) alone and during the flood, and the flood's completion and
          throughput. Run for a gateway and for the guide's 8-worker loop (`bench.guide`).
quota     Tenant `paced` (50/s, burst 5, max_concurrency 8, `sleep` 50 ms) and tenant
          `capped` (no rate limit, max_concurrency 4, `sleep` 50 ms) with backlogs in one
          gateway: paced's start rate over 20 s from `started_at`, and the most jobs of
          each tenant running at once from `started_at`/`finished_at`.
replicas  Two gateway processes in one consumer group, tenant `paced` at 50/s with a
          backlog: the total start rate over 20 s, measured once both are assigned.

Run: .venv/bin/python -m bench.pools [--scenario noisy|quota|replicas] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import (
    ChildProcess,
    ResultWatcher,
    Seen,
    assigned_jobs_partitions,
    bench_settings,
    broker,
    catalog_dir,
    gateway_process,
    machine_note,
    max_overlap,
    percentile,
    produce_jobs,
    wait_split,
)
from gateway.dev.services import Tansu
from gateway.settings import Settings

SLEEP_S = 0.005  # noisy neighbour jobs: `sleep` 5 ms for both tenants
FLOOD_QUEUED = 2000  # the flood tenant's max_queued (--flood-queued)
# From --gateway-env: settings to try on the gateways under test.
GATEWAY_ENV: dict[str, str] = {}


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is (full or --quick)."""

    flood_jobs: int
    steady_rate: float
    steady_s: float
    window_s: float


FULL = Sizes(flood_jobs=20_000, steady_rate=10.0, steady_s=30.0, window_s=20.0)
QUICK = Sizes(flood_jobs=5_000, steady_rate=10.0, steady_s=10.0, window_s=10.0)


async def _warm_up(
    settings: Settings, watcher: ResultWatcher, tenants: list[str], *processes: ChildProcess
) -> None:
    """One job per tenant through the system: the group is joined and flows are warm."""
    ids = set()
    for tenant in tenants:
        ids |= set(await produce_jobs(settings, 1, tenant, "sleep", {"seconds": 0}))
    if not await watcher.wait(ids, 90, processes):
        raise RuntimeError("warm-up jobs got no result within 90 s")


async def _count_records(bootstrap: str, topic: str) -> int:
    """Records on a topic, counted by reading it (Tansu's ListOffsets is unreliable)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
    )
    await consumer.start()
    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in parts])
        await consumer.seek_to_beginning()
        count, quiet_since = 0, time.monotonic()
        while time.monotonic() - quiet_since < 1.5:
            batches = await consumer.getmany(timeout_ms=200)
            fresh = sum(len(records) for records in batches.values())
            count += fresh
            if fresh:
                quiet_since = time.monotonic()
        return count
    finally:
        await consumer.stop()


# -- noisy neighbour ------------------------------------------------------------------


@dataclass
class NoisyFigures:
    system: str
    steady_p50_ms: float
    steady_p99_ms: float
    steady_max_ms: float
    steady_published_p99_ms: float
    # p99 of each leg, when the system reports started_at/finished_at (the gateway):
    # send -> start, start -> finish, finish -> result enqueued, enqueued -> seen here
    steady_legs_p99_ms: tuple[float, float, float, float] | None
    steady_done: int
    steady_sent: int
    flood_done: int = 0
    flood_duplicates: int = 0
    flood_jobs_per_s: float = 0.0
    flood_deferred_records: int | None = None
    paused_s: float = 0.0  # the gateway's intake paused (GATEWAY_MAX_BUFFERED reached)
    pauses: int = 0
    steady_series: list[tuple[float, float]] = field(default_factory=list)  # (sent s, ms)


async def _noisy_run(
    tansu: Tansu,
    workdir: Path,
    system: str,
    sizes: Sizes,
    flood_jobs: int,
    flood_rate: float,
    max_buffered: int,
    flood_queued: int,
) -> NoisyFigures:
    flood = {"conc": 64, "rate": flood_rate, "burst": int(flood_rate), "queued": flood_queued}
    if flood_rate <= 0:  # unthrottled: only the gateway's slots bound the flood
        flood = {"conc": 256, "queued": flood_queued}
    tenants = catalog_dir(
        {"flood": flood, "steady": {"conc": 8, "rate": 50, "burst": 50, "queued": 200}}
    )
    settings = await bench_settings(
        tansu.bootstrap, tenants, max_inflight=256, max_buffered=max_buffered
    )
    kafka, topics = settings.kafka, settings.topics
    label = f"{system}-{'flood' if flood_jobs else 'solo'}-{uuid.uuid4().hex[:4]}"
    if system == "gateway":
        process = gateway_process(settings, workdir / f"{label}.log", **GATEWAY_ENV)
    else:
        argv = [sys.executable, "-m", "bench.guide", "--bootstrap", kafka.bootstrap_servers]
        argv += ["--jobs", topics.jobs, "--results", topics.results, "--group", kafka.group_id]
        process = ChildProcess(argv, dict(os.environ), workdir / f"{label}.log")
    watcher = ResultWatcher(kafka.bootstrap_servers, topics.results)
    await watcher.start()
    process.start()
    try:
        await _warm_up(settings, watcher, ["flood", "steady"], process)
        flood_start = time.time()
        flood_ids = set(
            await produce_jobs(settings, flood_jobs, "flood", "sleep", {"seconds": SLEEP_S})
        )
        sent = await _steady_sender(settings, sizes.steady_rate, sizes.steady_s)
        await watcher.wait(set(sent), 120 if flood_jobs == 0 else 900, (process,))
        await watcher.wait(flood_ids, 900, (process,))
        exited = not process.alive()
    finally:
        code = process.stop()
        await watcher.stop()
        shutil.rmtree(tenants, ignore_errors=True)
    if exited:
        print(f"  {label} EXITED during the run with {code}; log {process.log_path}")
    latencies, published, series = [], [], []
    legs: list[tuple[float, float, float, float]] = []
    for job_id, at in sent.items():
        if job_id in watcher.by_id:
            first = watcher.by_id[job_id][0]
            latencies.append((first.arrived - at) * 1000)
            published.append((first.published - at) * 1000)
            series.append((at - flood_start, latencies[-1]))
            if first.started is not None and first.finished is not None:
                legs.append(
                    (
                        (first.started - at) * 1000,
                        (first.finished - first.started) * 1000,
                        (first.published - first.finished) * 1000,
                        (first.arrived - first.published) * 1000,
                    )
                )
    if not latencies:
        raise RuntimeError(f"{label}: no result for any of steady's jobs")
    figures = NoisyFigures(
        system=system,
        steady_p50_ms=percentile(latencies, 50),
        steady_p99_ms=percentile(latencies, 99),
        steady_max_ms=max(latencies),
        steady_published_p99_ms=percentile(published, 99),
        steady_legs_p99_ms=(
            (
                percentile([leg[0] for leg in legs], 99),
                percentile([leg[1] for leg in legs], 99),
                percentile([leg[2] for leg in legs], 99),
                percentile([leg[3] for leg in legs], 99),
            )
            if legs
            else None
        ),
        steady_done=len(latencies),
        steady_sent=len(sent),
        steady_series=series,
    )
    if flood_jobs:
        flood_seen = [s for i in flood_ids for s in watcher.by_id.get(i, [])]
        figures.flood_done = len({s.id for s in flood_seen})
        figures.flood_duplicates = len(flood_seen) - figures.flood_done
        last = max((s.arrived for s in flood_seen), default=flood_start + 1)
        figures.flood_jobs_per_s = figures.flood_done / (last - flood_start)
        if system == "gateway":
            deferred = await _count_records(kafka.bootstrap_servers, topics.deferred)
            figures.flood_deferred_records = deferred
    if system == "gateway":
        figures.pauses, figures.paused_s = _paused(process)
    return figures


def _paused(process: ChildProcess) -> tuple[int, float]:
    """How often and how long a gateway's intake paused, from its log."""
    paused = [e["ts"] for e in process.log_events("intake_paused")]
    resumed = [e["ts"] for e in process.log_events("intake_resumed")]
    total = sum(r - p for p, r in zip(paused, resumed, strict=False))
    return len(paused), total


async def _steady_sender(settings: Settings, rate: float, seconds: float) -> dict[str, float]:
    """Send steady's jobs at `rate` for `seconds` from their own producer; id -> send time."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=0)
    await producer.start()
    sent: dict[str, float] = {}
    try:
        begin = time.time()
        for n in range(round(rate * seconds)):
            await asyncio.sleep(max(0.0, begin + n / rate - time.time()))
            job_id = f"steady-{n}-{uuid.uuid4().hex[:6]}"
            body = {"id": job_id, "type": "sleep", "payload": {"seconds": SLEEP_S}}
            sent[job_id] = time.time()
            await producer.send(
                settings.topics.jobs,
                json.dumps(body).encode(),
                key=job_id.encode(),
                headers=[("tenant", b"steady")],
            )
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def noisy_neighbour(
    tansu: Tansu,
    workdir: Path,
    sizes: Sizes,
    flood_rate: float,
    max_buffered: int,
    flood_queued: int,
    systems: tuple[str, ...] = ("gateway", "guide"),
) -> bool:
    print(f"\n== noisy neighbour ({machine_note()})")
    rate = "unthrottled" if flood_rate <= 0 else f"{flood_rate:g}/s"
    print(
        f"flood: {sizes.flood_jobs} sleep {SLEEP_S * 1000:g} ms jobs at once (quota {rate}); "
        f"steady: {sizes.steady_rate:g}/s for {sizes.steady_s:g} s; same 4 partitions; "
        f"flood max_queued {flood_queued}, GATEWAY_MAX_BUFFERED {max_buffered}"
    )
    rows: list[tuple[NoisyFigures, NoisyFigures]] = []
    for system in systems:
        args = (flood_rate, max_buffered, flood_queued)
        solo = await _noisy_run(tansu, workdir, system, sizes, 0, *args)
        flooded = await _noisy_run(tansu, workdir, system, sizes, sizes.flood_jobs, *args)
        rows.append((solo, flooded))
    header = f"{'system':<22} {'steady alone p50/p99':>21} {'during flood p50/p99/max':>26}"
    header += f" {'bound':>8} {'met':>4} {'flood done/lost/dup':>20} {'flood jobs/s':>12}"
    print(header)
    met_all = True
    for solo, flooded in rows:
        bound = 2 * solo.steady_p99_ms + 50
        met = flooded.steady_p99_ms <= bound and flooded.steady_done == flooded.steady_sent
        met_all &= met or flooded.system != "gateway"
        lost = sizes.flood_jobs - flooded.flood_done
        print(
            f"{flooded.system:<22} {solo.steady_p50_ms:>9.0f} / {solo.steady_p99_ms:>6.0f} ms"
            f" {flooded.steady_p50_ms:>7.0f} / {flooded.steady_p99_ms:>6.0f} / "
            f"{flooded.steady_max_ms:>6.0f} ms {bound:>5.0f} ms {'yes' if met else 'no':>4}"
            f" {flooded.flood_done:>8}/{lost}/{flooded.flood_duplicates:<6}"
            f" {flooded.flood_jobs_per_s:>12.0f}"
        )
    for solo, flooded in rows:
        print(
            f"{flooded.system}: steady results {flooded.steady_done}/{flooded.steady_sent}; "
            f"p99 to the result's publish (record timestamp) alone "
            f"{solo.steady_published_p99_ms:.0f} ms, flood {flooded.steady_published_p99_ms:.0f} ms"
        )
        for name, figures in (("alone", solo), ("flood", flooded)):
            if figures.steady_legs_p99_ms is not None:
                start, run, enqueue, seen = figures.steady_legs_p99_ms
                print(
                    f"  p99 by leg {name}: send->start {start:.0f} ms, run {run:.0f} ms, "
                    f"finish->result enqueued {enqueue:.0f} ms, ->seen here {seen:.0f} ms"
                )
        buckets: dict[int, list[float]] = {}
        for at, ms in flooded.steady_series:
            buckets.setdefault(int(at // 5) * 5, []).append(ms)
        print(
            "  steady p99 by send time during the flood: "
            + ", ".join(f"{k}s {percentile(v, 99):.0f} ms" for k, v in sorted(buckets.items()))
        )
        if flooded.system == "gateway":
            print(
                f"  records on jobs.deferred: {flooded.flood_deferred_records} "
                f"(flood beyond its buffer: {max(0, sizes.flood_jobs - flood_queued)}); intake paused "
                f"{flooded.pauses} times for {flooded.paused_s:.1f} s in all "
                f"(alone: {solo.pauses})"
            )
    by_system = {row[1].system: row[1] for row in rows}
    if len(by_system) == 2:
        ratio = by_system["guide"].steady_p99_ms / by_system["gateway"].steady_p99_ms
        print(f"steady p99 during the flood, guide loop / gateway: {ratio:.1f}x")
    print(f"load after: {machine_note()}")
    return met_all


# -- quota accuracy -------------------------------------------------------------------


def _starts_in(seen: list[Seen], begin: float, end: float) -> int:
    return sum(1 for s in seen if s.started is not None and begin <= s.started < end)


def _per_second(seen: list[Seen], begin: float, seconds: int) -> list[int]:
    return [_starts_in(seen, begin + k, begin + k + 1) for k in range(seconds)]


async def quota_accuracy(tansu: Tansu, workdir: Path, sizes: Sizes) -> bool:
    print(f"\n== quota accuracy ({machine_note()})")
    window = sizes.window_s
    tenants = catalog_dir(
        {
            "paced": {"conc": 8, "rate": 50, "burst": 5, "queued": 200},
            "capped": {"conc": 4, "queued": 200},
        }
    )
    print(
        "paced: 50/s, burst 5, max_concurrency 8, max_queued 200, sleep 50 ms; "
        "capped: no rate limit, max_concurrency 4, max_queued 200, sleep 50 ms"
    )
    settings = await bench_settings(tansu.bootstrap, tenants, max_inflight=256)
    process = gateway_process(settings, workdir / "quota.log", **GATEWAY_ENV)
    watcher = ResultWatcher(settings.kafka.bootstrap_servers, settings.topics.results)
    await watcher.start()
    process.start()
    skip = 1.0
    backlog = round(50 * (window + skip + 10))
    try:
        await _warm_up(settings, watcher, ["paced", "capped"], process)
        paced_ids = await produce_jobs(settings, backlog, "paced", "sleep", {"seconds": 0.05})
        capped_ids = await produce_jobs(settings, backlog, "capped", "sleep", {"seconds": 0.05})
        first = await _first_start(watcher, set(paced_ids), 60)
        await asyncio.sleep(max(0.0, first + skip + window + 2.0 - time.time()))
    finally:
        process.stop()
        await watcher.stop()
        shutil.rmtree(tenants, ignore_errors=True)
    paced = [s for s in watcher.seen if s.id in set(paced_ids)]
    capped = [s for s in watcher.seen if s.id in set(capped_ids)]
    begin = first + skip
    starts = _starts_in(paced, begin, begin + window)
    rate = starts / window
    accounted = (_starts_in(paced, first, first + window) - 5) / window
    per_second = _per_second(paced, begin, int(window))
    ok_rate = abs(rate - 50) <= 2.5

    def overlap(seen: list[Seen]) -> int:
        return max_overlap([(s.started, s.finished) for s in seen if s.started and s.finished])

    paced_conc, capped_conc = overlap(paced), overlap(capped)
    capped_rate = _starts_in(capped, begin, begin + window) / window
    print(
        f"paced start rate over {window:g} s (from {skip:g} s after its first start): "
        f"{rate:.2f}/s = {rate / 50:.3f} of configured (target 0.95..1.05): "
        f"{'met' if ok_rate else 'MISSED'}"
    )
    print(f"  from its first start, its burst of 5 subtracted: {accounted:.2f}/s")
    print(f"  starts per second: {per_second}")
    print(
        f"most running at once: paced {paced_conc} (max_concurrency 8), "
        f"capped {capped_conc} (max_concurrency 4; its start rate {capped_rate:.1f}/s)"
    )
    ok_conc = paced_conc <= 8 and capped_conc <= 4
    print(f"concurrency never above max_concurrency: {'met' if ok_conc else 'MISSED'}")
    print(f"load after: {machine_note()}")
    return ok_rate and ok_conc


async def _first_start(watcher: ResultWatcher, ids: set[str], timeout_s: float) -> float:
    """started_at of the first of `ids` to start (waits for a few results first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = [s for s in watcher.seen if s.id in ids and s.started is not None]
        if len(seen) >= 20:
            return min(s.started for s in seen if s.started is not None)
        await asyncio.sleep(0.1)
    raise RuntimeError("no results from the backlog")


# -- two replicas ---------------------------------------------------------------------


async def two_replicas(tansu: Tansu, workdir: Path, sizes: Sizes) -> bool:
    print(f"\n== two replicas ({machine_note()})")
    window = sizes.window_s
    tenants = catalog_dir({"paced": {"conc": 8, "rate": 50, "burst": 4, "queued": 200}})
    print("paced: 50/s, burst 4, max_concurrency 8, max_queued 200, sleep 100 ms; 4 partitions")
    settings = await bench_settings(
        tansu.bootstrap,
        tenants,
        kafka_overrides={
            "session_timeout_ms": 3000,
            "heartbeat_interval_ms": 300,
            "rebalance_timeout_ms": 3000,
        },
    )
    processes = [
        gateway_process(
            settings, workdir / f"replica-{n}.log", **{**GATEWAY_ENV, "GATEWAY_REPLICA": f"r{n}"}
        )
        for n in (1, 2)
    ]
    watcher = ResultWatcher(settings.kafka.bootstrap_servers, settings.topics.results)
    await watcher.start()
    joined = time.monotonic()
    for process in processes:
        process.start()
    skip = 1.0
    try:
        split = await wait_split(processes, settings.topics.jobs, settings.kafka.partitions, 60)
        print(f"both assigned after {time.monotonic() - joined:.1f} s: partitions {split}")
        ids = await produce_jobs(
            settings, round(50 * (window + skip + 15)), "paced", "sleep", {"seconds": 0.1}
        )
        first = await _first_start(watcher, set(ids), 60)
        await asyncio.sleep(max(0.0, first + skip + window + 2.0 - time.time()))
        after = [assigned_jobs_partitions(p, settings.topics.jobs) for p in processes]
    finally:
        for process in processes:
            process.stop()
        await watcher.stop()
        shutil.rmtree(tenants, ignore_errors=True)
    begin = first + skip
    paced = [s for s in watcher.seen if s.id in set(ids)]
    total = _starts_in(paced, begin, begin + window) / window
    # A result has its job's key, so it lands in the partition number its job came from.
    per_replica = [
        _starts_in([s for s in paced if s.partition in mine], begin, begin + window) / window
        for mine in split
    ]
    ok = abs(total - 50) <= 5.0 and after == split
    print(
        f"total start rate over {window:g} s: {total:.2f}/s = {total / 50:.3f} of configured "
        f"(target 0.90..1.10): {'met' if ok else 'MISSED'}"
    )
    print("  per replica: " + ", ".join(f"r{n + 1} {r:.2f}/s" for n, r in enumerate(per_replica)))
    if after != split:
        print(f"  the assignment changed during the window: {after}")
    print(f"load after: {machine_note()}")
    return ok


async def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    sizes = QUICK if args.quick else FULL
    if args.flood_jobs is not None:
        sizes = Sizes(args.flood_jobs, sizes.steady_rate, sizes.steady_s, sizes.window_s)
    for item in args.gateway_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("GATEWAY_"):
            raise SystemExit(f"--gateway-env wants GATEWAY_NAME=VALUE, not {item!r}")
        GATEWAY_ENV[key] = value
    workdir = Path(tempfile.mkdtemp(prefix="bench-pools-"))
    print(f"bench.pools {'quick' if args.quick else 'full'}; logs in {workdir}")
    if GATEWAY_ENV:
        print(f"gateway settings tried: {GATEWAY_ENV}")
    results: dict[str, bool] = {}
    with broker() as tansu:
        if args.scenario in ("all", "noisy"):
            systems = ("gateway", "guide") if args.system == "both" else (args.system,)
            results["noisy"] = await noisy_neighbour(
                tansu,
                workdir,
                sizes,
                args.flood_rate,
                args.max_buffered,
                args.flood_queued,
                systems,
            )
        if args.scenario in ("all", "quota"):
            results["quota"] = await quota_accuracy(tansu, workdir, sizes)
        if args.scenario in ("all", "replicas"):
            results["replicas"] = await two_replicas(tansu, workdir, sizes)
    print("\ntargets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in results.items()))
    return 0


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=["all", "noisy", "quota", "replicas"], default="all")
    parser.add_argument("--quick", action="store_true", help="smaller and shorter (a smoke run)")
    parser.add_argument(
        "--system",
        choices=["both", "gateway", "guide"],
        default="both",
        help="noisy neighbour: which systems to run",
    )
    parser.add_argument("--flood-jobs", type=int, help="override the flood size")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a GATEWAY_* setting to try on the gateways under test (repeatable)",
    )
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=600.0,
        help="the flood tenant's rate_per_s (0: unthrottled, bounded by the gateway's slots)",
    )
    parser.add_argument(
        "--flood-queued",
        type=int,
        default=FLOOD_QUEUED,
        help="the flood tenant's max_queued (beyond it, its jobs go to jobs.deferred)",
    )
    parser.add_argument(
        "--max-buffered",
        type=int,
        default=Settings.model_fields["max_buffered"].default,
        help="GATEWAY_MAX_BUFFERED for the noisy neighbour (default: the gateway's own)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(_args())))
