"""The delay queue: one timer, items due in time order, removable, supervised."""

from __future__ import annotations

import asyncio
import time

from gateway.delays import DelayQueue
from gateway.tasks import Supervisor


async def test_items_come_due_in_order_and_removed_ones_never() -> None:
    due: list[str] = []
    supervisor = Supervisor()
    queue: DelayQueue[str] = DelayQueue(due.append, supervisor)
    await queue.start()
    now = int(time.time() * 1000)
    try:
        queue.add(now + 120, "late")
        queue.add(now + 40, "early")
        queue.add(now + 80, "gone")
        queue.add(now - 1000, "overdue")
        assert queue.remove(lambda item: item == "gone") == ["gone"]
        for _ in range(100):
            if len(due) == 3:
                break
            await asyncio.sleep(0.01)
        assert due == ["overdue", "early", "late"]
        assert len(queue) == 0
    finally:
        held = await queue.stop()
    assert held == []
    assert supervisor.failure is None


async def test_stop_returns_what_was_still_held() -> None:
    queue: DelayQueue[int] = DelayQueue(lambda _: None, Supervisor())
    await queue.start()
    queue.add(int(time.time() * 1000) + 60_000, 1)
    assert await queue.stop() == [1]


async def test_a_failing_callback_is_a_supervised_failure() -> None:
    failures: list[tuple[str, str]] = []

    def explode(_: int) -> None:
        raise RuntimeError("bug")

    queue: DelayQueue[int] = DelayQueue(explode, Supervisor(lambda *f: failures.append(f)))
    await queue.start()
    queue.add(0, 1)
    for _ in range(100):
        if failures:
            break
        await asyncio.sleep(0.01)
    assert failures == [("gateway:delays", "RuntimeError")]
    await queue.stop()
