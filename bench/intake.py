"""Issue 3 benchmark: one gateway process against Tansu, ratios measured in the same run.

(a) `echo`: gateway throughput vs a bare loop creating, running and stopping one
    PenguiFlow flow per job without Kafka (the per-job ceiling).
(b) `sleep` 50 ms: gateway throughput vs the worker loop of the PenguiFlow
    worker-integration guide (8 workers, one job at a time, commit after each).

Run: .venv/bin/python -m bench.intake [--jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import OffsetAndMetadata
from penguiflow import Headers, Message, Node, NodePolicy, create

from bench.common import Measure, bench_settings, broker, catalog_dir, peak_rss_mb, produce_jobs
from gateway.catalog import load_catalog
from gateway.service import Gateway
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
    try:
        while gateway.pools.completed == 0:  # exclude the group join from the window
            await asyncio.sleep(0.005)
        first = gateway.pools.completed
        measure = Measure()
        with measure.window():
            while gateway.pools.completed < jobs:
                await asyncio.sleep(0.005)
        done = gateway.pools.completed - first
    finally:
        await gateway.stop()
    return done / measure.wall_s, measure.cpu_s / done * 1000


async def guide_worker_loop(settings: Settings, jobs: int, seconds: float) -> tuple[float, float]:
    """The guide's pattern: 8 workers, one job each at a time, a flow per job, commit after each."""
    await produce_jobs(settings, jobs, "bench", "sleep", {"seconds": seconds})
    kafka = settings.kafka
    consumer = AIOKafkaConsumer(
        settings.topics.jobs,
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=kafka.group_id + "-guide",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        max_poll_records=1,
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=0)
    await consumer.start()
    await producer.start()
    done = 0
    lock = asyncio.Lock()

    async def sleep_node(message: Message, _: Any) -> Any:
        await asyncio.sleep(message.payload["seconds"])
        return message.payload

    async def worker() -> None:
        nonlocal done
        while done < jobs:
            async with lock:  # one fetch at a time, like a queue's fetch()
                batch = await consumer.getmany(timeout_ms=200, max_records=1)
            for tp, records in batch.items():
                for record in records:
                    body = json.loads(record.value)
                    trace_id = f"job-{body['id']}"
                    flow = create(
                        (Node(sleep_node, name="sleep", policy=NodePolicy(validate="none")), [])
                    )
                    flow.run()
                    try:
                        message = Message(
                            payload=body["payload"],
                            headers=Headers(tenant="bench"),
                            trace_id=trace_id,
                        )
                        await flow.emit(message, trace_id=trace_id)
                        result = await asyncio.wait_for(flow.fetch(trace_id=trace_id), 300)
                        await producer.send_and_wait(
                            settings.topics.results,
                            json.dumps(getattr(result, "payload", result)).encode(),
                        )
                        await consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "")})
                        done += 1
                    finally:
                        await flow.stop()

    while not consumer.assignment():
        await asyncio.sleep(0.05)
    measure = Measure()
    try:
        with measure.window():
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))), timeout=600)
    finally:
        await consumer.stop()
        await producer.stop()
    return done / measure.wall_s, measure.cpu_s / max(done, 1) * 1000


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
