"""The peer systems of the benchmark, each run as its own process (so CPU and RSS are its own).

    python -m bench.peer_systems raw|guide|faststream --bootstrap HOST:PORT \
        --jobs TOPIC --results TOPIC --group ID [--workers N]
        consumes `jobs` and publishes one result per job to `results` until SIGTERM.
    python -m bench.peer_systems bare --workload echo|sleep|noisy --out FILE [--sizes JSON]
        the bare PenguiFlow loop: no Kafka, an in-memory queue fed by the same
        workload code; writes what it observed to FILE as JSON.

raw         an aiokafka consume -> produce -> commit loop that does no work: it forwards
            each job record as its result (the upper bound of any Kafka worker here).
guide       the worker loop of the PenguiFlow worker-integration guide: 8 workers, one
            fetch at a time, a new flow per job with trace-scoped emit/fetch, the result
            sent and acknowledged, then that record's offset committed.
faststream  a FastStream KafkaBroker subscriber with `max_workers` concurrent handlers,
            each running the same one-node flow per message and publishing the result.
            With max_workers > 1 FastStream requires its default ack policy (ACK_FIRST:
            offsets auto-committed as records are handed to workers, at-most-once).
bare        create/run/emit/fetch/stop one flow per job, no Kafka (the per-job ceiling).

pyrallel-consumer runs from its own Python 3.12 venv: see `bench.peer_pyrallel`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import signal
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import OffsetAndMetadata

from bench.peer_flow import Job, job_from_body, parse_job, result_value, run_flow
from bench.peer_load import Sizes, run_workload

GUIDE_WORKERS = 8
FETCH_MAX_WAIT_MS = 50  # as the gateway is run: Tansu waits the whole fetch_max_wait


def _consumer(args: argparse.Namespace, **extra: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        args.jobs,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        **extra,
    )


def _tenant_header(job: Job) -> list[tuple[str, bytes]]:
    return [("tenant", job.tenant.encode())]


async def _until_stopped(stop: asyncio.Event, *tasks: asyncio.Task[None]) -> None:
    """Wait for SIGTERM (or a task failing), then cancel the tasks."""
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    for task in (waiter, *tasks):
        task.cancel()
    await asyncio.gather(waiter, *tasks, return_exceptions=True)
    for task in done:
        if task is not waiter and not task.cancelled() and (exc := task.exception()) is not None:
            raise exc


async def raw_pipe(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Consume a batch, produce one record per job, await the acks, commit the batch."""
    consumer = _consumer(args, enable_auto_commit=False, max_poll_records=500)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=2)
    await consumer.start()
    await producer.start()

    async def loop() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            acks = [
                await producer.send(
                    args.results, record.value, key=record.key, headers=list(record.headers)
                )
                for records in batch.values()
                for record in records
            ]
            if acks:
                await asyncio.gather(*acks)
                await consumer.commit(
                    {
                        tp: OffsetAndMetadata(records[-1].offset + 1, "")
                        for tp, records in batch.items()
                    }
                )

    try:
        await _until_stopped(stop, asyncio.create_task(loop()))
    finally:
        await consumer.stop()
        await producer.stop()


async def guide_loop(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """The guide's pattern on Kafka, as bench/intake.py runs it for `sleep` jobs."""
    consumer = _consumer(args, enable_auto_commit=False, max_poll_records=1)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=0)
    await consumer.start()
    await producer.start()
    lock = asyncio.Lock()

    async def worker() -> None:
        while True:
            async with lock:  # one fetch at a time, like a queue's fetch()
                batch = await consumer.getmany(timeout_ms=200, max_records=1)
            for tp, records in batch.items():
                for record in records:
                    job = parse_job(record.value)
                    result = await run_flow(job, trace_scoped=True)
                    await producer.send_and_wait(
                        args.results,
                        result_value(job, result),
                        key=job.id.encode(),
                        headers=_tenant_header(job),
                    )
                    await consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "")})

    try:
        workers = [asyncio.create_task(worker()) for _ in range(GUIDE_WORKERS)]
        await _until_stopped(stop, *workers)
    finally:
        await consumer.stop()
        await producer.stop()


async def faststream_subscriber(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """A FastStream app: one subscriber with `max_workers` handlers, flow per message."""
    from faststream.kafka import KafkaBroker  # only in the bench venv

    # Per-message "Received"/"Processed" lines at DEBUG (off), as no system here logs
    # per job; errors still reach the log.
    broker = KafkaBroker(args.bootstrap, linger_ms=2, log_level=logging.DEBUG)

    @broker.subscriber(
        args.jobs,
        group_id=args.group,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        max_workers=args.workers,
    )
    async def handle(body: dict[str, Any]) -> None:  # FastStream decodes the JSON body
        job = job_from_body(body)
        result = await run_flow(job)
        await broker.publish(
            result_value(job, result),
            args.results,
            key=job.id.encode(),
            headers={"tenant": job.tenant},
        )

    await broker.start()
    try:
        await stop.wait()
    finally:
        await broker.stop()


# -- bare PenguiFlow: no Kafka ---------------------------------------------------------


class MemoryTarget:
    """A FIFO queue worked off by `workers` tasks, each running one flow per job."""

    def __init__(self, workers: int) -> None:
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._done: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._work()) for _ in range(workers)]

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            await run_flow(job)
            self._done[job.id] = time.time()
            self._changed.set()

    async def send(self, body: dict[str, Any], *, paced: bool) -> None:
        self._queue.put_nowait(Job(body["id"], body["tenant"], body["type"], body["payload"]))

    async def flush(self) -> None:
        return None

    def done_at(self, job_id: str) -> float | None:
        return self._done.get(job_id)

    async def wait_done(self, ids: set[str], deadline: float) -> None:
        while any(i not in self._done for i in ids) and time.time() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.time()))
            except TimeoutError:
                return

    def cpu_s(self) -> float:
        return time.process_time()

    def reset_peak_rss(self) -> None:
        reset_peak_rss(None)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(None)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def reset_peak_rss(pid: int | None) -> None:
    """Start a new peak-RSS window for a process (Linux: clear_refs 5 resets VmHWM)."""
    # Older kernels refuse: the peak then covers the process's whole life.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid or 'self'}/clear_refs").write_text("5")


def peak_rss_mb(pid: int | None) -> float:
    """VmHWM of a process in MiB (ru_maxrss where /proc is missing)."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid is None else 0.0


async def bare(args: argparse.Namespace) -> None:
    """Run one workload against the in-memory target and write the phases as JSON."""
    sizes = Sizes(**json.loads(args.sizes))
    # echo: one job at a time is the per-job ceiling (a CPU-bound loop gains nothing
    # from concurrency); sleep and noisy: as many at once as the gateway runs.
    workers = 1 if args.workload == "echo" else args.workers
    target = MemoryTarget(workers)
    try:
        phases = await run_workload(target, args.workload, sizes, slow=False)
    finally:
        await target.stop()
    out = {"phases": [p.to_json() for p in phases], "workers": workers}
    await asyncio.to_thread(Path(args.out).write_text, json.dumps(out))


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = {"raw": raw_pipe, "guide": guide_loop, "faststream": faststream_subscriber}
    await runner[args.system](args, stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("system", choices=["raw", "guide", "faststream", "bare"])
    parser.add_argument("--bootstrap")
    parser.add_argument("--jobs")
    parser.add_argument("--results")
    parser.add_argument("--group")
    parser.add_argument("--workers", type=int, default=256)
    parser.add_argument("--workload", choices=["echo", "sleep", "noisy"])
    parser.add_argument("--sizes", default="{}", help="peer_load.Sizes fields as JSON")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(bare(args) if args.system == "bare" else _serve(args))


if __name__ == "__main__":
    main()
