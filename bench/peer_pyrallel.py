"""pyrallel-consumer running the same one-flow-per-job work; runs in its own Python 3.12 venv.

    .venv-pyrallel/bin/python -m bench.peer_pyrallel --bootstrap HOST:PORT \
        --jobs TOPIC --results TOPIC --group ID [--workers N]

PyrallelConsumer in its asyncio execution mode, unordered (every job id is its own
key, so key ordering would buy nothing), at most `--workers` jobs in flight. Its
control plane commits an offset only behind a contiguous run of completed records
(at-least-once). The worker publishes the result with aiokafka, as the other peers
do, and returns once the broker acknowledged it. Imports only what that venv holds:
pyrallel-consumer, PenguiFlow, aiokafka and `bench.peer_flow`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from aiokafka import AIOKafkaProducer
from pyrallel_consumer import (
    ExecutionMode,
    KafkaConfig,
    OrderingMode,
    PyrallelConsumer,
    WorkItem,
)

from bench.peer_flow import parse_job, result_value, run_flow

FETCH_MAX_WAIT_MS = 50  # librdkafka waits 500 ms by default, and Tansu always waits it out


class _BenchKafkaConfig(KafkaConfig):
    """KafkaConfig whose consumer waits on fetches as briefly as the other peers do."""

    def get_consumer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_consumer_config()
        config["fetch.wait.max.ms"] = FETCH_MAX_WAIT_MS
        return config


def _config(args: argparse.Namespace) -> KafkaConfig:
    config = _BenchKafkaConfig(
        BOOTSTRAP_SERVERS=args.bootstrap,
        CONSUMER_GROUP=args.group,
        AUTO_OFFSET_RESET="earliest",
        SESSION_TIMEOUT_MS=6000,
        dlq_enabled=False,
    )
    config.parallel_consumer.ordering_mode = OrderingMode.UNORDERED
    config.parallel_consumer.execution.mode = ExecutionMode.ASYNC
    config.parallel_consumer.execution.max_in_flight = args.workers
    config.parallel_consumer.execution.max_retries = 1
    return config


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=2)
    await producer.start()

    async def worker(item: WorkItem) -> None:
        job = parse_job(item.payload)
        result = await run_flow(job)
        await producer.send_and_wait(
            args.results,
            result_value(job, result),
            key=job.id.encode(),
            headers=[("tenant", job.tenant.encode())],
        )

    consumer = PyrallelConsumer(config=_config(args), worker=worker, topic=args.jobs)
    await consumer.start()
    try:
        await stop.wait()
    finally:
        await consumer.stop()
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--jobs", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--workers", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
