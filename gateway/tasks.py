"""Long-lived tasks: started through a supervisor, ended on purpose, never dying silently.

A process (the gateway, the API process) owns one `Supervisor`. Every loop that must run
as long as the process does (fetching, commits, the delay queue, the outbox, the topic
readers, the dispatcher, the API-process channel) is started with `spawn` and ended with
`cancel`. A task that ends any other way (an exception, a return, a cancellation nobody
asked for) is a failure that is not one record's fault: the supervisor logs which task
and why, remembers it (readiness reports it) and calls `on_failure`, which stops the
process with a non-zero exit code instead of letting it run on half alive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["Supervisor", "cancel_and_wait", "first_of"]

log = logging.getLogger("gateway.tasks")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task we own and wait until it has ended.

    `asyncio.wait` is used instead of awaiting the task under a suppress, so the
    task's own CancelledError is consumed while a cancellation of the caller still
    propagates.
    """
    if task is None:
        return
    # A task may swallow one cancellation (a library's wait_for racing its own
    # completion): ask again until it ends.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "background_task_failed",
            extra={"task": task.get_name(), "error": type(task.exception()).__name__},
        )


async def first_of(timeout_s: float, *waits: Awaitable[Any]) -> None:
    """Return once any of `waits` is done or `timeout_s` has passed; the rest are cancelled."""
    futures = {asyncio.ensure_future(wait) for wait in waits}
    try:
        await asyncio.wait(futures, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()


class Supervisor:
    """The long-lived tasks of one process; an unplanned end of any of them is fatal."""

    def __init__(self, on_failure: Callable[[str, str], None] | None = None) -> None:
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ending: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.failure: str | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a task that must run until `cancel` (or `close`) ends it."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def release(self, task: asyncio.Task[Any] | None) -> None:
        """Mark a task whose end is now planned (it will end on its own, asked to)."""
        if task is not None:
            self._ending.add(task)

    async def cancel(self, task: asyncio.Task[Any] | None) -> None:
        """End a task on purpose and wait for it (an exception it raised is logged)."""
        if task is None:
            return
        self._ending.add(task)
        await cancel_and_wait(task)

    async def close(self) -> None:
        """End every task still running (shutdown); from now on no end is a failure."""
        self._closing = True
        for task in list(self._tasks):
            await self.cancel(task)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        planned = task in self._ending or self._closing
        self._ending.discard(task)
        if planned:
            return
        if task.cancelled():
            why = "cancelled"
        elif task.exception() is not None:
            why = type(task.exception()).__name__
        else:
            why = "returned"
        name = task.get_name()
        # The exception's type only: its text can carry record data or secret values.
        log.error("task_failed", extra={"task": name, "error": why})
        if self.failure is None:
            self.failure = f"{name}: {why}"
        if self._on_failure is not None:
            self._on_failure(name, why)
