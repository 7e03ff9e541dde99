"""Issue 3 benchmark: one gateway process against Tansu, ratios measured in the same run.

(a) `echo`: gateway throughput vs a bare loop creating, running and stopping one
    PenguiFlow flow per job without Kafka (the per-job ceiling).
(b) `sleep` 50 ms: gateway throughput vs the worker loop of the PenguiFlow
    worker-integration guide (`bench.guide`: 8 workers, one job at a time, commit after each).

Run: .venv/bin/python -m bench.intake [--jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from penguiflow import Headers, Message, Node, NodePolicy, create

from bench.common import Measure, bench_settings, broker, catalog_dir, peak_rss_mb, produce_jobs
from bench.guide import GuideLoop
from gateway.catalog import load_catalog
from gateway.service import Gateway, tune_gc
from gateway.settings import Settings


async def bare_penguiflow(jobs: int, *, trace_scoped: bool = False) -> tuple[float, float]:
    """Jobs/s and CPU ms/job of create/run/emit/fetch/stop per job, no Kafka.

    `trace_scoped` uses emit(trace_id=...)/fetch(trace_id=...) as the worker guide
    recommends; otherwise the plain emit/fetch the gateway itself uses (one flow per
    job needs no trace demultiplexing), which is the stricter ceiling.
    """

    async def echo(message: Message, _: Any) -> Any:
        return message.payload

    measure = Measure()
    with measure.window():
        for n in range(jobs):
            flow = create((Node(echo, name="echo", policy=NodePolicy(validate="none")), []))
            flow.run()
            message = Message(payload={"n": n}, headers=Headers(tenant="a"), trace_id=f"job-{n}")
            if trace_scoped:
                await flow.emit(message, trace_id=message.trace_id)
                await asyncio.wait_for(flow.fetch(trace_id=message.trace_id), 5)
            else:
                await flow.emit(message)
                await asyncio.wait_for(flow.fetch(), 5)
            await flow.stop()
    return jobs / measure.wall_s, measure.cpu_s / jobs * 1000


async def gateway_run(
    settings: Settings, jobs: int, job_type: str, payload: dict[str, Any]
) -> tuple[float, float]:
    """Jobs/s and CPU ms/job of one in-process gateway draining `jobs` pre-produced jobs."""
    await produce_jobs(settings, jobs, "bench", job_type, payload)
    gateway = Gateway(settings, load_catalog(settings.tenants_dir, settings.policies_dir))
    await gateway.start()
    tune_gc(settings)  # as `gateway run` does
    try:
        while gateway.recorder.completed == 0:  # exclude the group join from the window
            await asyncio.sleep(0.005)
        first = gateway.recorder.completed
        measure = Measure()
        with measure.window():
            while gateway.recorder.completed < jobs:
                await asyncio.sleep(0.005)
        done = gateway.recorder.completed - first
    finally:
        await gateway.stop()
    return done / measure.wall_s, measure.cpu_s / done * 1000


async def guide_worker_loop(settings: Settings, jobs: int, seconds: float) -> tuple[float, float]:
    """Jobs/s and CPU ms/job of the guide's worker loop (`bench.guide`) draining `jobs`."""
    await produce_jobs(settings, jobs, "bench", "sleep", {"seconds": seconds})
    kafka, topics = settings.kafka, settings.topics
    loop = GuideLoop(
        kafka.bootstrap_servers,
        topics.jobs,
        topics.results,
        kafka.group_id + "-guide",
        kafka.fetch_max_wait_ms,
    )
    await loop.start()
    measure = Measure()
    try:
        await loop.wait_assigned()
        with measure.window():
            await asyncio.wait_for(loop.run(lambda: loop.done >= jobs), timeout=600)
    finally:
        await loop.stop()
    return loop.done / measure.wall_s, measure.cpu_s / max(loop.done, 1) * 1000


async def main(jobs: int, sleep_jobs: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    tenants = catalog_dir({"bench": {}})
    with broker() as tansu:
        bare_rate, bare_cpu = await bare_penguiflow(jobs)
        guide_bare_rate, guide_bare_cpu = await bare_penguiflow(jobs, trace_scoped=True)
        settings = await bench_settings(tansu.bootstrap, tenants, max_inflight=256)
        echo_rate, echo_cpu = await gateway_run(settings, jobs, "echo", {"n": 1})
        settings = await bench_settings(tansu.bootstrap, tenants, max_inflight=256)
        sleep_rate, sleep_cpu = await gateway_run(settings, sleep_jobs, "sleep", {"seconds": 0.05})
        settings = await bench_settings(tansu.bootstrap, tenants)
        guide_jobs = max(200, sleep_jobs // 10)
        guide_rate, guide_cpu = await guide_worker_loop(settings, guide_jobs, 0.05)
    print(f"{'system':<38} {'jobs/s':>9} {'CPU ms/job':>11}")
    print(f"{'bare PenguiFlow loop (echo, no Kafka)':<38} {bare_rate:>9.0f} {bare_cpu:>11.3f}")
    print(
        f"{'bare loop, guide trace-scoped fetch':<38} {guide_bare_rate:>9.0f} {guide_bare_cpu:>11.3f}"
    )
    print(f"{'gateway echo':<38} {echo_rate:>9.0f} {echo_cpu:>11.3f}")
    print(f"{'gateway sleep 50 ms':<38} {sleep_rate:>9.0f} {sleep_cpu:>11.3f}")
    print(f"{'guide worker loop sleep 50 ms (8 w.)':<38} {guide_rate:>9.0f} {guide_cpu:>11.3f}")
    print(f"ratio echo gateway / bare loop: {echo_rate / bare_rate:.2f}  (target >= 0.70)")
    print(f"ratio echo gateway / guide-style bare loop: {echo_rate / guide_bare_rate:.2f}")
    print(
        f"ratio sleep gateway / guide loop: {sleep_rate / guide_rate:.1f}x  (target >= 5x, and >= 800 jobs/s)"
    )
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000, help="echo jobs per system")
    parser.add_argument("--sleep-jobs", type=int, default=10_000, help="sleep jobs for the gateway")
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.sleep_jobs))
