"""A job on its way through the gateway, with the offset ticket(s) it finishes."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from dataclasses import dataclass, field

from gateway.envelope import Job
from gateway.offsets import Ticket

__all__ = ["Entry"]


@dataclass(eq=False, slots=True)
class Entry:
    """Built by admission for each valid record; finished by the recorder.

    `followers` are tickets of redeliveries of the same job that arrived while it was
    queued or running: they finish with it.
    """

    job: Job
    ticket: Ticket
    partition: Hashable
    followers: list[Ticket] = field(default_factory=list)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # True only while the task awaits the flow, the one place a task cancellation
    # requested by a user is turned into a `cancelled` outcome.
    in_flow: bool = False

    @property
    def tickets(self) -> list[Ticket]:
        """Every offset ticket this job's outcome finishes."""
        return [self.ticket, *self.followers]
