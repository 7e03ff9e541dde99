"""A group-less reader of whole topics, from their beginning, for views every replica keeps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.kafka import groupless_consumer, stop_consumer
from gateway.settings import KafkaSettings
from gateway.tasks import Supervisor

__all__ = ["TopicReader"]

Batches = dict[TopicPartition, list[Any]]


class TopicReader:
    """Assigns every partition of `topics`, reads them from the start, and hands each
    fetched batch to `handle`.

    `caught_up` is set at the first poll that returns nothing: everything already on the
    topics has been read. (Log-end offsets from ListOffsets are not reliable on every
    broker, Tansu's among them.)
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[str],
        *,
        name: str,
        handle: Callable[[Batches], None],
        max_records: int,
        logger: logging.Logger,
        supervisor: Supervisor,
    ) -> None:
        self._settings = settings
        self._supervisor = supervisor
        self._topics = tuple(topics)
        self._name = name
        self._handle = handle
        self._max_records = max_records
        self._log = logger
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()

    async def start(self) -> None:
        """Assign every partition of the topics and begin reading from the start."""
        consumer = groupless_consumer(self._settings, self._name)
        await consumer.start()
        self._consumer = consumer
        await consumer.topics()  # loads metadata for every topic
        tps = [
            TopicPartition(topic, p)
            for topic in self._topics
            for p in sorted(consumer.partitions_for_topic(topic) or set())
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._task = self._supervisor.spawn(self._run(consumer), f"gateway:{self._name}")

    async def stop(self) -> None:
        """Stop reading; idempotent."""
        task, self._task = self._task, None
        await self._supervisor.cancel(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await stop_consumer(consumer)

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=self._max_records)
            except KafkaError as exc:
                self._log.warning(f"{self._name}_fetch_failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(1.0)
                continue
            if not batches:
                self.caught_up.set()
            try:
                self._handle(batches)
            except Exception as exc:  # noqa: BLE001  # one bad batch must not stop the view
                self._log.error(
                    f"{self._name}_records_skipped",
                    extra={"error": type(exc).__name__, "records": sum(map(len, batches.values()))},
                )
