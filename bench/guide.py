"""The worker loop of the PenguiFlow worker-integration guide, on Kafka: our baseline.

8 workers; each fetches one record at a time (one fetch at a time, like a queue's
`fetch()`), runs it in a new flow with the guide's trace-scoped emit/fetch, publishes
the result and commits that record's offset before taking the next. It has no notion
of tenants: records are worked off in partition order.

In-process: `await GuideLoop(...).run(until)`. As its own process (so a benchmark can
measure it from outside, as it measures a gateway process):

    python -m bench.guide --bootstrap HOST:PORT --jobs TOPIC --results TOPIC --group ID

which runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import OffsetAndMetadata
from penguiflow import Headers, Message, Node, NodePolicy, create

WORKERS = 8


async def _sleep_node(message: Message, _: Any) -> Any:
    await asyncio.sleep(message.payload.get("seconds", 0))
    return message.payload


class GuideLoop:
    """The guide's pattern: 8 workers, one job each at a time, a flow per job, commit after each."""

    def __init__(
        self,
        bootstrap: str,
        jobs_topic: str,
        results_topic: str,
        group_id: str,
        fetch_max_wait_ms: int = 50,
    ) -> None:
        self._results = results_topic
        self.consumer = AIOKafkaConsumer(
            jobs_topic,
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=fetch_max_wait_ms,
            max_poll_records=1,
        )
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        self.done = 0

    async def start(self) -> None:
        await self.consumer.start()
        await self.producer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producer.stop()

    async def wait_assigned(self) -> None:
        while not self.consumer.assignment():
            await asyncio.sleep(0.05)

    async def run(self, until: Callable[[], bool]) -> None:
        """Run the workers until `until()` is true (checked between jobs)."""
        lock = asyncio.Lock()

        async def worker() -> None:
            while not until():
                async with lock:  # one fetch at a time, like a queue's fetch()
                    batch = await self.consumer.getmany(timeout_ms=200, max_records=1)
                for tp, records in batch.items():
                    for record in records:
                        await self._process(tp, record)

        await asyncio.gather(*(worker() for _ in range(WORKERS)))

    async def _process(self, tp: Any, record: Any) -> None:
        """The guide's `process_job`: a flow per job, result, then commit."""
        body = json.loads(record.value)
        tenant = dict(record.headers or ()).get("tenant", b"").decode()
        trace_id = f"job-{body['id']}"
        node = Node(_sleep_node, name="sleep", policy=NodePolicy(validate="none"))
        flow = create((node, []))
        flow.run()
        try:
            message = Message(
                payload=body["payload"],
                headers=Headers(tenant=tenant or "bench"),
                trace_id=trace_id,
            )
            await flow.emit(message, trace_id=trace_id)
            result = await asyncio.wait_for(flow.fetch(trace_id=trace_id), 300)
            outcome = {
                "id": body["id"],
                "tenant": tenant,
                "status": "succeeded",
                "result": getattr(result, "payload", result),
            }
            await self.producer.send_and_wait(
                self._results, json.dumps(outcome).encode(), key=record.key
            )
            await self.consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "")})
            self.done += 1
        finally:
            await flow.stop()


async def _main(args: argparse.Namespace) -> None:
    loop = GuideLoop(args.bootstrap, args.jobs, args.results, args.group)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await loop.start()
    try:
        await loop.run(stopping.is_set)
    finally:
        await loop.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--jobs", required=True, help="topic to consume")
    parser.add_argument("--results", required=True, help="topic to publish results to")
    parser.add_argument("--group", required=True, help="consumer group id")
    asyncio.run(_main(parser.parse_args()))
