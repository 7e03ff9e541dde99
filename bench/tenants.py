"""Many tenants: the cost of picking the next job, loading the catalog, and running jobs of
1,000 active tenants out of 10,000 against the same jobs from two tenants.

    .venv/bin/python -m bench.tenants [--jobs 20000] [--quick]

Prints one table per question and writes bench/results/tenants.json. Ratios compare
runs made in the same process one after the other (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, bench_settings, broker, machine_note, produce_jobs
from gateway.catalog import CatalogLoader
from gateway.process import tune_gc
from gateway.quotas import TokenBucket
from gateway.scheduler import FairScheduler, TenantLimits
from gateway.service import Gateway

RESULTS = ROOT / "bench" / "results" / "tenants.json"
LIMITS = TenantLimits(max_concurrency=4, rate_per_s=1e6, burst=10**6, max_queued=10**6, weight=1)


class LinearScan:
    """The pick as it was before the heap: a scan of every tenant (the baseline)."""

    def __init__(self, tenants: int, items: int) -> None:
        self.queues = {
            f"t{n}": [0, 0.0, items, TokenBucket(1e6, 10**6, 0.0)] for n in range(tenants)
        }

    def pop(self, now: float) -> str | None:
        best, best_pass = None, 0.0
        for tenant, (running, passed, items, bucket) in self.queues.items():
            if not items or running >= 4 or bucket.available(now) < 1.0:
                continue
            if best is None or passed < best_pass:
                best, best_pass = tenant, passed
        if best is not None:
            queue = self.queues[best]
            queue[0] += 1
            queue[1] += 1.0
            queue[2] -= 1
            queue[3].try_take(now)
        return best

    def release(self, tenant: str) -> None:
        self.queues[tenant][0] -= 1


def pick_cost(tenants: int, picks: int) -> tuple[float, float]:
    """Microseconds per pick and release: the heap scheduler, and the linear scan."""
    scheduler: FairScheduler[int] = FairScheduler(total_slots=256)
    items = picks // tenants + 8  # every tenant keeps a backlog to the end
    for n in range(tenants):
        scheduler.configure(f"t{n}", LIMITS, 0.0)
        for item in range(items):
            scheduler.push(f"t{n}", item)
    running: list[str] = []
    rng = random.Random(1)
    began = time.perf_counter()
    for _ in range(picks):
        picked = scheduler.pop(0.0)
        if picked is not None:
            running.append(picked[0])
        if running and (len(running) > 200 or picked is None):
            scheduler.release(running.pop(rng.randrange(len(running))))
    heap_us = (time.perf_counter() - began) / picks * 1e6
    scan = LinearScan(tenants, items)
    scan_running: list[str] = []
    scan_picks = min(picks, max(2000, 2_000_000 // tenants))
    began = time.perf_counter()
    for _ in range(scan_picks):
        tenant = scan.pop(0.0)
        if tenant is not None:
            scan_running.append(tenant)
        if scan_running and (len(scan_running) > 200 or tenant is None):
            scan.release(scan_running.pop(rng.randrange(len(scan_running))))
    scan_us = (time.perf_counter() - began) / scan_picks * 1e6
    return heap_us, scan_us


def write_catalog(directory: Path, tenants: int) -> None:
    for n in range(tenants):
        (directory / f"t{n:05d}.toml").write_text(
            f'id = "t{n:05d}"\ntier = "pro"\n[quota]\nmax_concurrency = 64\nrate_per_s = 100000\n'
            f'burst = 100000\nmax_queued = 100000\n[jobs]\nallowed_types = ["echo"]\n'
        )


def catalog_times(directory: Path, rounds: int) -> tuple[list[float], list[float]]:
    """Full loads, and reloads after one file changed, each `rounds` times (seconds)."""
    full, one = [], []
    for _ in range(rounds):
        loader = CatalogLoader(directory, ROOT / "policies")
        began = time.perf_counter()
        loader.load()
        full.append(time.perf_counter() - began)
        path = directory / "t00042.toml"
        path.write_text(path.read_text() + "\n")
        began = time.perf_counter()
        loader.load()
        one.append(time.perf_counter() - began)
    return full, one


async def drain(bootstrap: str, tenants_dir: Path, jobs: int, active: int) -> tuple[float, int]:
    """Jobs/s of one in-process gateway draining `jobs` echo jobs spread over `active`
    tenants, and the number of tenant label values on its metrics."""
    settings = await bench_settings(
        bootstrap, tenants_dir, max_inflight=256, http={"enabled": False}
    )
    per_tenant = max(1, jobs // active)
    for n in range(active):
        await produce_jobs(settings, per_tenant, f"t{n:05d}", "echo", {"n": 1})
    loader = CatalogLoader(tenants_dir, ROOT / "policies")
    gateway = Gateway(settings, loader.load(), loader=loader)
    await gateway.start()
    tune_gc(settings)
    total = per_tenant * active
    try:
        while gateway.recorder.completed == 0:
            await asyncio.sleep(0.005)
        first, began = gateway.recorder.completed, time.perf_counter()
        while gateway.recorder.completed < total:
            await asyncio.sleep(0.01)
        rate = (gateway.recorder.completed - first) / (time.perf_counter() - began)
        text = gateway.metrics.render().decode()
        series = {
            line.split('tenant="', 1)[1].split('"', 1)[0]
            for line in text.splitlines()
            if 'tenant="' in line and not line.startswith("#")
        }
    finally:
        await gateway.stop()
    return rate, len(series)


async def main(jobs: int, quick: bool) -> None:
    logging.basicConfig(level=logging.WARNING)
    figures: dict[str, Any] = {"machine": machine_note()}
    print(f"# many tenants ({machine_note()})")
    print("\n## pick cost (us per pick and release; 256 slots, every tenant backlogged)\n")
    print("| tenants | heap | linear scan (before) | scan / heap |")
    print("|---:|---:|---:|---:|")
    picks = 20_000 if quick else 100_000
    figures["pick_us"] = {}
    for tenants in (10, 100, 1_000, 10_000):
        heap_us, scan_us = pick_cost(tenants, picks)
        figures["pick_us"][tenants] = {"heap": heap_us, "scan": scan_us}
        print(f"| {tenants:,} | {heap_us:.2f} | {scan_us:.2f} | {scan_us / heap_us:.1f} |")

    directory = Path(tempfile.mkdtemp(prefix="bench-10k-"))
    try:
        write_catalog(directory, 10_000)
        full, one = catalog_times(directory, 2 if quick else 5)
        figures["catalog_s"] = {"full": full, "one_changed": one}
        print("\n## catalog of 10,000 tenants (seconds; median and range)\n")
        print("| load | median | min | max |")
        print("|---|---:|---:|---:|")
        for name, values in (("full", full), ("one file changed", one)):
            print(
                f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | "
                f"{max(values):.3f} |"
            )
        with broker() as tansu:
            rates = {}
            for active in (2, 1_000):
                rates[active] = await drain(tansu.bootstrap, directory, jobs, active)
        figures["drain"] = {
            str(k): {"jobs_per_s": v[0], "tenant_series": v[1]} for k, v in rates.items()
        }
        print(f"\n## {jobs:,} echo jobs, catalog of 10,000 tenants, one in-process gateway\n")
        print("| active tenants | jobs/s | tenant label values on /metrics |")
        print("|---:|---:|---:|")
        for active, (rate, series) in rates.items():
            print(f"| {active:,} | {rate:,.0f} | {series} |")
        ratio = rates[1_000][0] / rates[2][0]
        figures["ratio_1000_to_2"] = ratio
        print(f"\n1,000 active tenants against 2: {ratio:.2f} of the throughput")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and jobs")
    args = parser.parse_args()
    asyncio.run(main(5_000 if args.quick else args.jobs, args.quick))


if __name__ == "__main__":
    cli()
