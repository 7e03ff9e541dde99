"""What the gateway adds around aiokafka's clients."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer

from gateway.envelope import Source, header_bytes
from gateway.settings import KafkaSettings

__all__ = ["groupless_consumer", "record_size", "source_of", "stop_consumer"]

log = logging.getLogger("gateway.kafka")


def groupless_consumer(kafka: KafkaSettings, name: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer outside any group (partitions assigned by hand, nothing committed), named
    `<client_id>-<name>`; `options` override aiokafka's settings."""
    settings: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": f"{kafka.client_id}-{name}",
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": kafka.fetch_max_wait_ms,
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    return AIOKafkaConsumer(**(settings | options))


async def stop_consumer(consumer: Any) -> None:
    """`consumer.stop()`, finished even when aiokafka gets in its own way.

    aiokafka 0.14's fetcher, while closing, cancels its pending fetch requests and then
    awaits them: a request that was waiting out a retry backoff re-raises that
    CancelledError out of `stop()`, before the client's connections are closed. That
    error is the consumer's own and is absorbed here (and the client closed); a
    cancellation of the caller still propagates.
    """
    task = asyncio.current_task()
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        if task is not None and task.cancelling():
            raise
        log.debug("consumer_stop_interrupted")
        await consumer._client.close()  # what stop() did not reach


def source_of(record: Any) -> Source:
    """The parts of a consumed record (aiokafka's ConsumerRecord) the gateway keeps."""
    return Source(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        value=record.value,
        headers=tuple(record.headers or ()),
        timestamp_ms=record.timestamp or 0,
        key=record.key,
    )


def record_size(record: Any) -> int:
    """Bytes of a consumed record the memory bounds count: value, key and headers."""
    return len(record.value or b"") + len(record.key or b"") + header_bytes(record.headers or ())
