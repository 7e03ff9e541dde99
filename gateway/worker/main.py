"""A worker: `python -m gateway.worker CHANNEL_FD`, started by `gateway run --workers N`.

A whole gateway (`gateway.service.Gateway`: intake, pools, runner, recorder, its own
producer, Vault session and topic readers) in the consumer group of the process that
started it, under a replica name of its own (`<replica>-w<index>`), so partitions and
every tenant's quota are shared with it as with another machine's replica. It has no
listener: the gateway process's API process serves the machine, and this worker
answers the gateway process over its channel (readiness, its metric families, its
tenant figures) and hands it every result it records, for `GET` to answer at once.

It holds the Vault credentials, as the gateway process does, so it makes itself
undumpable first: the credentials come over the channel afterwards, never through its
environment. It ignores SIGINT (Ctrl-C reaches the whole process group; the gateway
process decides), stops as `gateway run` does on SIGTERM (a second exits at once), on
the channel's `Stop`, when the channel closes, and on Linux when its parent dies
(PR_SET_PDEATHSIG). Stopped by the gateway process, it says when it has drained and
commits and leaves the group only when told that every worker has (`gateway.worker.pool`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

from prometheus_client.core import Metric

from gateway.api.channel import ResultReady
from gateway.catalog import CatalogLoader
from gateway.channel import Answer, Call, Channel, ChannelError, Started, Stop
from gateway.errors import GatewayError
from gateway.observability import configure_logging
from gateway.process import die_with_parent, make_undumpable
from gateway.records import JobStatus
from gateway.service import Gateway, serve
from gateway.tasks import cancel_and_wait, first_of
from gateway.worker.channel import Drained, Leave, Reload, WorkerInit, codec

__all__ = ["main"]

log = logging.getLogger("gateway.workers")

# The gateway process sends the settings right after starting the worker.
_INIT_TIMEOUT_S = 30.0


class _Link:
    """This worker's side of the channel: answers, forwards results, obeys."""

    def __init__(self, channel: Channel, gateway: Gateway) -> None:
        self._channel = channel
        self._gateway = gateway
        self._answers: dict[str, Answer] = {
            "ready": gateway.not_ready_reasons,
            "metrics": self._metric_families,
            "tenants": gateway.tenant_figures,
        }
        # A worker drains within its grace and the produce timeout; so do the others.
        settings = gateway.settings
        self._leave_bound_s = settings.shutdown_grace_s + settings.kafka.produce_timeout_s
        self._stop_asked = False
        self._leave = asyncio.Event()
        gateway.recorder.on_result = self._forward_result
        gateway.before_leaving_group = self._drained

    async def listen(self) -> None:
        """Act on what the gateway process says, until its channel closes."""
        try:
            while (message := await self._channel.receive()) is not None:
                if isinstance(message, Call):
                    self._channel.answer(message, self._answers)
                elif isinstance(message, Reload):
                    self._gateway.reload_catalog()
                elif isinstance(message, Stop):
                    self._stop_asked = True
                    self._gateway.request_stop()
                elif isinstance(message, Leave):
                    self._leave.set()
        except ChannelError as exc:
            log.error("worker_channel_bad_message", extra={"error": str(exc)[:200]})
        # The gateway process is gone (or has stopped talking): so is this worker.
        self._leave.set()
        self._gateway.request_stop()

    def started(self) -> None:
        self._channel.send(Started())

    def _forward_result(self, value: bytes, status: JobStatus) -> None:
        self._channel.send(ResultReady(value, status), droppable=True)

    async def _metric_families(self) -> list[Metric]:
        return self._gateway.metrics.families()

    async def _drained(self) -> None:
        # Stopped by the gateway process: leave the group with the others, not before.
        if self._stop_asked:
            self._channel.send(Drained())
            await first_of(self._leave_bound_s, self._leave.wait())


async def _run(channel_fd: int) -> int:
    channel = await Channel.open(socket.socket(fileno=channel_fd), codec(), "worker")
    try:
        init = await asyncio.wait_for(channel.receive(), _INIT_TIMEOUT_S)
    except (TimeoutError, ChannelError):
        init = None
    if not isinstance(init, WorkerInit):
        await channel.close()
        return 2
    settings = init.settings
    configure_logging(settings.log_format, settings.log_level, settings.replica)
    try:
        loader = CatalogLoader(settings.tenants_dir, settings.policies_dir)
        gateway = Gateway(settings, loader.load(), loader=loader)
    except GatewayError as exc:
        log.error("start_failed", extra={"error": str(exc)})
        await channel.close()
        return 1
    link = _Link(channel, gateway)
    listener = asyncio.create_task(link.listen(), name="worker-channel")
    try:
        code, _ = await serve(gateway, stop_signals=(signal.SIGTERM,), on_started=link.started)
    finally:
        await cancel_and_wait(listener)
        await channel.close()
    return code


def main() -> None:
    """Entry point of `python -m gateway.worker`."""
    channel_fd = int(sys.argv[1])
    # Before the settings (and the Vault credentials in them) arrive.
    make_undumpable()
    # Ctrl-C reaches the whole process group; the gateway process decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    sys.exit(asyncio.run(_run(channel_fd)))
