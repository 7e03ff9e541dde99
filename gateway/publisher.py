"""The one producer: sends records and waits (boundedly) for the broker's acknowledgement."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

from gateway.errors import ProduceError
from gateway.records import OutRecord
from gateway.settings import KafkaSettings

__all__ = ["Publisher"]

log = logging.getLogger("gateway.publisher")


class Publisher:
    """Produces contract records; `send` returns only once every record is acknowledged."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=f"{settings.client_id}-producer",
            linger_ms=settings.linger_ms,
            acks="all",
            # Tansu rejects the idempotent producer; ordering per key is kept by
            # max_in_flight=1 inside aiokafka's sender.
            enable_idempotence=False,
            request_timeout_ms=settings.request_timeout_ms,
            max_request_size=4 * 1024 * 1024,
            max_batch_size=settings.max_batch_bytes,
        )
        # Keyed records go where aiokafka's own `send` would put them (murmur2 of the
        # key), so a job's records share a partition whichever path sent them.
        self._partitioner = DefaultPartitioner()
        self._background: set[asyncio.Future[Any]] = set()
        self._started = False

    async def start(self) -> None:
        """Connect to the broker."""
        if not self._started:
            await self._producer.start()
            self._started = True

    async def stop(self) -> None:
        """Flush what is queued (bounded) and close; idempotent."""
        if not self._started:
            return
        self._started = False
        await self.drain()
        await self._producer.stop()

    async def _enqueue(self, record: OutRecord) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = await self._producer.send(
            record.topic, value=record.value, key=record.key, headers=record.headers
        )
        return future

    async def _enqueue_batches(self, records: Sequence[OutRecord]) -> list[asyncio.Future[Any]]:
        """Append the records to one batch per partition and queue the batches: about a
        third of the CPU of `send` per record, which matters when a burst's deferrals
        (thousands of records) go out while other tenants' records wait to be read.
        Order per partition is the order of `records`."""
        producer = self._producer
        partitions: dict[str, list[int]] = {}
        batches: dict[tuple[str, int], BatchBuilder] = {}
        futures: list[asyncio.Future[Any]] = []
        for record in records:
            topic = record.topic
            if topic not in partitions:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            every = partitions[topic]
            partition = self._partitioner(record.key, every, every)
            batch = batches.get((topic, partition))
            if batch is None:
                batch = batches[topic, partition] = producer.create_batch()
            while not batch.append(
                key=record.key, value=record.value, timestamp=None, headers=record.headers
            ):
                # Full: queue it and start another (an empty batch takes any record).
                futures.append(await self._queue(batch, topic, partition))
                batch = batches[topic, partition] = producer.create_batch()
        for (topic, partition), batch in batches.items():
            futures.append(await self._queue(batch, topic, partition))
        return futures

    async def _queue(self, batch: BatchBuilder, topic: str, partition: int) -> asyncio.Future[Any]:
        while True:
            try:
                future: asyncio.Future[Any] = await self._producer.send_batch(
                    batch, topic, partition=partition
                )
            except KafkaTimeoutError:
                # aiokafka 0.14 (`MessageAccumulator.add_batch`) takes the whole time
                # waited so far off its budget on every turn of its wait loop, so with
                # several senders on one partition it gives up within milliseconds. It
                # raises before queueing the batch, so queueing it again is safe; the
                # caller's produce timeout bounds the whole.
                continue
            return future

    async def send(self, records: Sequence[OutRecord]) -> None:
        """Produce records and wait for all acknowledgements, or raise ProduceError."""
        timeout = self._settings.produce_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*await self._enqueue_batches(records))
        except TimeoutError:
            raise ProduceError(f"broker did not acknowledge within {timeout}s") from None
        except KafkaError as exc:
            raise ProduceError(f"produce failed: {type(exc).__name__}") from exc

    async def send_later(self, record: OutRecord) -> None:
        """Produce a record whose acknowledgement nobody waits for (status transitions)."""
        try:
            future = await asyncio.wait_for(
                self._enqueue(record), timeout=self._settings.produce_timeout_s
            )
        except (TimeoutError, KafkaError) as exc:
            log.warning("status_produce_failed", extra={"error": type(exc).__name__})
            return
        self._background.add(future)
        future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("status_produce_failed", extra={"error": type(future.exception()).__name__})

    async def drain(self) -> None:
        """Wait (bounded) until every background record is acknowledged."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=self._settings.produce_timeout_s)
