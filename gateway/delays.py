"""Holds retry and deferred records until their `not-before`, with one timer and no polling."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from gateway.tasks import Supervisor

__all__ = ["DelayQueue"]

T = TypeVar("T")


class DelayQueue(Generic[T]):
    """A timer heap: `due(item)` is called for each item once its time (epoch ms) comes."""

    def __init__(self, due: Callable[[T], None], supervisor: Supervisor) -> None:
        self._due = due
        self._supervisor = supervisor
        self._heap: list[tuple[int, int, T]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, not_before_ms: int, item: T) -> None:
        """Hold an item until `not_before_ms`."""
        heapq.heappush(self._heap, (not_before_ms, next(self._seq), item))
        if self._heap[0][2] is item:
            self._changed.set()

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out every held item matching `predicate`."""
        kept = [entry for entry in self._heap if not predicate(entry[2])]
        removed = [entry[2] for entry in self._heap if predicate(entry[2])]
        heapq.heapify(kept)
        self._heap = kept
        self._changed.set()
        return removed

    async def start(self) -> None:
        """Start the timer task."""
        if self._task is None:
            self._task = self._supervisor.spawn(self._run(), "gateway:delays")

    async def stop(self) -> list[T]:
        """Stop the timer; returns what was still held (it was not finished)."""
        task, self._task = self._task, None
        await self._supervisor.cancel(task)
        held = [entry[2] for entry in self._heap]
        self._heap.clear()
        return held

    async def _run(self) -> None:
        while True:
            now_ms = int(time.time() * 1000)
            while self._heap and self._heap[0][0] <= now_ms:
                _, _, item = heapq.heappop(self._heap)
                self._due(item)
            self._changed.clear()
            timeout = (self._heap[0][0] - now_ms) / 1000 if self._heap else None
            # asyncio.timeout, not wait_for (which on 3.11 can swallow a cancellation).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
