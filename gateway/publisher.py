"""The one producer: sends records and waits (boundedly) for the broker's acknowledgement."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

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
        )
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

    async def send(self, records: Sequence[OutRecord]) -> None:
        """Produce records and wait for all acknowledgements, or raise ProduceError."""
        timeout = self._settings.produce_timeout_s
        try:
            async with asyncio.timeout(timeout):
                futures = [await self._enqueue(record) for record in records]
                await asyncio.gather(*futures)
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
