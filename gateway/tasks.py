"""Ending the background tasks a component owns."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["cancel_and_wait"]

log = logging.getLogger("gateway.tasks")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task we own and wait until it has ended.

    `asyncio.wait` is used instead of awaiting the task under a suppress, so the
    task's own CancelledError is consumed while a cancellation of the caller still
    propagates.
    """
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "background_task_failed",
            extra={"task": task.get_name(), "error": type(task.exception()).__name__},
        )
