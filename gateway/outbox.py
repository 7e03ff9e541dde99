"""The one producer of a process and the one way its records leave: batched and acknowledged.

Records are `post`ed with an optional `done` callback, run once every one of them is
settled: acknowledged by the broker, or refused for good and replaced by its fallback
(see `gateway.records`), or refused with no fallback left (logged and dropped).

Posts wait in one lane per tenant, and one sender task takes them in small rounds,
visiting the lanes in turn (at most `_LANE_SHARE` records of a lane per visit), so a
quiet tenant's result never queues behind a flood's thousands of deferrals (invariant
6 holds on the way out too). Each round is handed to the producer in order (records of
one partition keep their order within a tenant) and a waiter task per round collects
the acknowledgements, so several rounds are in flight at once.

Errors are split by what they say about the record:

- transient (the broker unreachable, a timeout, a leader moving; aiokafka's `retriable`
  flag, plus its client-side timeouts) are retried with backoff until the record is
  `produce_timeout_s` old. Past that the broker is down, not the record bad: a posted
  record makes `on_fatal` stop the process (its offsets stay uncommitted and the work is
  redelivered); a caller of `send` gets `ProduceError`.
- permanent for one record (too large, invalid) turn into its fallback records, so no
  single record can stop the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from gateway.errors import ProduceError, ReplicaFenced
from gateway.health import BrokerHealth
from gateway.records import OutRecord, record_size
from gateway.settings import KafkaSettings
from gateway.tasks import Supervisor

__all__ = ["Outbox", "is_transient"]

log = logging.getLogger("gateway.outbox")

_ROUND_RECORDS = 500
_ROUND_BYTES = 4 * 1024 * 1024
_LANE_SHARE = 32
_RETRY_BACKOFF_S = (0.1, 2.0)  # first and longest wait before a transient failure's retry


def is_transient(exc: BaseException) -> bool:
    """Whether a produce error says nothing about the record itself (retry it)."""
    if isinstance(exc, KafkaTimeoutError | KafkaConnectionError | TimeoutError):
        return True
    return isinstance(exc, KafkaError) and bool(exc.retriable)


@dataclass(eq=False, slots=True)
class _Delivery:
    """One `post`: its records settle one by one; `done` runs when the last one has."""

    remaining: int
    done: Callable[[], None] | None
    waiter: asyncio.Future[None] | None = None  # set for `send`: resolved when settled
    error: ProduceError | None = None


@dataclass(eq=False, slots=True)
class _Item:
    record: OutRecord
    delivery: _Delivery
    deadline: float  # monotonic: transient failures are retried until then
    lane: str
    tries: int = 0


class _Lanes:
    """Queued items, one FIFO lane per tenant, taken in turn."""

    def __init__(self) -> None:
        self._lanes: dict[str, deque[_Item]] = {}
        self._turns: deque[str] = deque()  # lanes with items, in visiting order
        self.count = 0

    def __bool__(self) -> bool:
        return self.count > 0

    def extend(self, items: list[_Item]) -> None:
        for item in items:
            lane = self._lanes.get(item.lane)
            if lane is None:
                lane = self._lanes[item.lane] = deque()
            if not lane:
                self._turns.append(item.lane)
            lane.append(item)
        self.count += len(items)

    def take(self, max_records: int, max_bytes: int) -> list[_Item]:
        taken: list[_Item] = []
        size = 0
        turns = self._turns
        while turns and len(taken) < max_records and size < max_bytes:
            name = turns.popleft()
            lane = self._lanes[name]
            for _ in range(min(_LANE_SHARE, len(lane), max_records - len(taken))):
                item = lane.popleft()
                taken.append(item)
                size += len(item.record.value or b"")
            if lane:
                turns.append(name)
            else:
                del self._lanes[name]
        self.count -= len(taken)
        return taken


class Outbox:
    """The producer and its sender; `post` never blocks, `send` waits for the broker."""

    def __init__(
        self,
        settings: KafkaSettings,
        supervisor: Supervisor,
        *,
        client_id: str,
        on_fatal: Callable[[BaseException], None] | None = None,
        health: BrokerHealth | None = None,
        fence: Callable[[], bool] | None = None,
    ) -> None:
        self._settings = settings
        self._health = health
        # True once this replica must write nothing more (it slept through its session).
        self._fence = fence
        self._supervisor = supervisor
        self._on_fatal = on_fatal
        self._client_id = client_id
        # Made at start: an AIOKafkaProducer that is never started warns when collected.
        self._producer: AIOKafkaProducer | None = None
        self._queue = _Lanes()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._unsettled = 0
        self._sender: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Task[None]] = set()
        self._retrying: dict[_Item, asyncio.TimerHandle] = {}
        self._started = False
        self._failed = False
        # Records the broker refused for good (each then replaced by its fallback).
        self.refused = 0

    async def start(self) -> None:
        """Connect to the broker and start sending."""
        if self._started:
            return
        settings = self._settings
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=self._client_id,
            linger_ms=settings.linger_ms,
            acks="all",
            # Tansu rejects the idempotent producer; ordering per key is kept by
            # max_in_flight=1 inside aiokafka's sender.
            enable_idempotence=False,
            request_timeout_ms=settings.request_timeout_ms,
            max_request_size=settings.max_request_bytes,
            # Larger batches than aiokafka's 16 KiB: a full batch makes the next record
            # of its partition wait until the batch has left.
            max_batch_size=settings.max_batch_bytes,
        )
        await producer.start()
        if self._fence is not None:
            _refuse_produce_when_fenced(producer, self._fence)
        self._producer = producer
        self._started = True
        self._sender = self._supervisor.spawn(self._run(), "gateway:outbox")

    async def stop(self) -> None:
        """Stop sending and close the producer; what is unsent stays unsettled (its
        offsets uncommitted, so the work is redelivered); idempotent."""
        if not self._started:
            return
        self._started = False
        await self._supervisor.cancel(self._sender)
        self._sender = None
        for handle in self._retrying.values():
            handle.cancel()
        self._retrying.clear()
        for task in list(self._waiters):
            task.cancel()
        if self._waiters:
            await asyncio.wait(set(self._waiters))
        if self._producer is not None:
            await self._producer.stop()

    # -- posting ---------------------------------------------------------------

    def post(
        self,
        records: Sequence[OutRecord],
        done: Callable[[], None] | None = None,
        *,
        tenant: str = "",
    ) -> None:
        """Queue records in `tenant`'s lane; `done()` runs once all of them are settled
        (never if the process stops first)."""
        if not records:
            if done is not None:
                done()
            return
        delivery = _Delivery(len(records), done)
        self._enqueue(records, delivery, tenant)

    async def send(self, records: Sequence[OutRecord], *, tenant: str = "") -> None:
        """Produce records and wait until the broker has every one, or raise ProduceError
        (refused, or not acknowledged within the produce timeout)."""
        if not records:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        delivery = _Delivery(len(records), None, waiter)
        self._enqueue(records, delivery, tenant)
        await waiter

    def _enqueue(self, records: Sequence[OutRecord], delivery: _Delivery, lane: str) -> None:
        deadline = time.monotonic() + self._settings.produce_timeout_s
        self._queue.extend([_Item(record, delivery, deadline, lane) for record in records])
        self._unsettled += len(records)
        self._idle.clear()
        self._wake.set()

    @property
    def failed(self) -> bool:
        """A posted record could not be written in time: the process must stop."""
        return self._failed

    async def drain(self, timeout_s: float) -> bool:
        """Wait (bounded) until every posted record is settled; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # -- sending ---------------------------------------------------------------

    async def _run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._fence is not None and self._fence():
                # Others own this replica's partitions now: anything written could be a
                # second outcome of a job they ran. Write nothing; the process stops.
                log.error("outbox_fenced", extra={"unsent": queue.count})
                self._fatal(ReplicaFenced("slept through the consumer-group session"))
                await asyncio.Event().wait()  # until the shutdown cancels this task
            round_ = queue.take(_ROUND_RECORDS, _ROUND_BYTES)
            sent: list[tuple[_Item, asyncio.Future[Any]]] = []
            producer = self._producer
            assert producer is not None  # the sender runs only once started
            for item in round_:
                record = item.record
                try:
                    future = await producer.send(
                        record.topic, value=record.value, key=record.key, headers=record.headers
                    )
                except KafkaError as exc:  # raised at once: too large, or no metadata in time
                    self._failed_item(item, exc)
                    continue
                except (AssertionError, TypeError, ValueError) as exc:
                    # The client refused the record itself (a null key and value, a header
                    # it cannot encode): that record's problem, never the sender's.
                    self._failed_item(item, exc)
                    continue
                sent.append((item, future))
            if sent:
                waiter = asyncio.create_task(self._collect(sent), name="gateway:outbox-acks")
                self._waiters.add(waiter)
                waiter.add_done_callback(self._waiters.discard)

    async def _collect(self, sent: list[tuple[_Item, asyncio.Future[Any]]]) -> None:
        try:
            futures = {future for _, future in sent}
            latest = max(item.deadline for item, _ in sent)
            _, pending = await asyncio.wait(futures, timeout=max(0.0, latest - time.monotonic()))
            acknowledged = False
            for item, future in sent:
                if future in pending:
                    future.cancel()
                    self._give_up(item, "no acknowledgement")
                elif future.exception() is not None:
                    self._failed_item(item, future.exception())
                else:
                    acknowledged = True
                    self._settle(item)
            if acknowledged and self._health is not None:
                self._health.ok()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  # a bug here must stop the process, loudly
            log.error("outbox_failed", extra={"error": type(exc).__name__})
            self._fatal(exc)

    def _failed_item(self, item: _Item, exc: BaseException | None) -> None:
        assert exc is not None
        if is_transient(exc):
            if self._health is not None:
                self._health.failed(type(exc).__name__)
            if time.monotonic() >= item.deadline:
                self._give_up(item, type(exc).__name__)
                return
            item.tries += 1
            first, longest = _RETRY_BACKOFF_S
            delay = min(longest, first * 2 ** (item.tries - 1))
            loop = asyncio.get_running_loop()
            self._retrying[item] = loop.call_later(delay, self._requeue, item)
            return
        record = item.record
        self.refused += 1
        log.error(
            "record_refused",
            extra={
                "topic": record.topic,
                "error": type(exc).__name__,
                "bytes": record_size(record),
                "fallback": len(record.fallback),
            },
        )
        delivery = item.delivery
        if delivery.waiter is not None:
            delivery.error = ProduceError(f"the broker refused a record: {type(exc).__name__}")
        if record.fallback:
            delivery.remaining += len(record.fallback) - 1
            self._unsettled += len(record.fallback) - 1
            fallbacks = [
                _Item(each, delivery, item.deadline, item.lane) for each in record.fallback
            ]
            self._queue.extend(fallbacks)
            self._wake.set()
            return
        self._settle(item)

    def _requeue(self, item: _Item) -> None:
        del self._retrying[item]
        self._queue.extend([item])
        self._wake.set()

    def _give_up(self, item: _Item, why: str) -> None:
        timeout = self._settings.produce_timeout_s
        error = ProduceError(f"broker did not acknowledge within {timeout:g}s ({why})")
        delivery = item.delivery
        if delivery.waiter is not None:
            delivery.error = error
            self._settle(item)
            return
        log.error("outcome_not_recorded", extra={"topic": item.record.topic, "error": why})
        self._fatal(error)

    def _fatal(self, exc: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        if self._on_fatal is not None:
            self._on_fatal(exc)

    def _settle(self, item: _Item) -> None:
        delivery = item.delivery
        delivery.remaining -= 1
        if delivery.remaining == 0:
            if delivery.waiter is not None and not delivery.waiter.done():
                if delivery.error is not None:
                    delivery.waiter.set_exception(delivery.error)
                else:
                    delivery.waiter.set_result(None)
            elif delivery.done is not None:
                delivery.done()
        self._unsettled -= 1
        if self._unsettled == 0:
            self._idle.set()


def _refuse_produce_when_fenced(producer: AIOKafkaProducer, fenced: Callable[[], bool]) -> None:
    """Make the producer's own client refuse to send records once the replica is fenced.

    Records handed to aiokafka wait in its accumulator for their batch to leave; a
    replica frozen at that moment would, on waking, send them before any task of ours
    ran and noticed: a second result for a job the partition's new owner ran. The check
    sits where the request leaves, on this producer's client only; `fenced()` tells a
    stalled loop from its clock alone, so it holds before the watch has ticked."""
    client = producer.client
    send = client.send

    async def guarded(node_id: int, request: Any, *args: Any, **kwargs: Any) -> Any:
        if type(request).__name__.startswith("ProduceRequest") and fenced():
            raise KafkaConnectionError("replica fenced: it writes nothing more")
        return await send(node_id, request, *args, **kwargs)

    client.send = guarded
