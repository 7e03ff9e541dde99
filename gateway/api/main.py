"""The API process: `python -m gateway.api TENANT_FD OPS_FD CHANNEL_FD`, started by the gateway.

Why a process of its own: in a thread of the job process, every answer waited for the
interpreter lock behind the job loop (a p99 of 20-60 ms for `GET /v1/jobs/{id}` under
500 jobs/s, against about 5 ms from here). Everything the API reads or writes already
works over Kafka: this process runs its own status view (`jobs.status` and
`jobs.results`) and its own producer. What only the gateway knows (readiness, the
metrics registry, per-tenant pool figures) it asks over the channel.

It serves the tenant API on the first socket and the operators' listener on the
second (either may be -1: off), ignores SIGINT (the gateway decides when it stops),
stops on the channel's `Stop` or when the channel closes, and on Linux also dies with
its parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.api.admin import AdminApi
from gateway.api.channel import (
    AdminDone,
    CatalogChanged,
    Channel,
    Denied,
    Init,
    LogLine,
    ResultReady,
    Started,
    Stop,
    open_channel,
)
from gateway.api.dlq import DlqBrowser, DlqIndex
from gateway.api.httpserver import HttpServer
from gateway.api.ops import DlqCollector, OpsApi
from gateway.api.statusview import StatusView
from gateway.api.tenant import TenantApi
from gateway.api.timing import RequestTimer, request_histogram
from gateway.observability import configure_logging
from gateway.outbox import Outbox
from gateway.process import die_with_parent, tune_gc
from gateway.tasks import Supervisor, first_of

__all__ = ["main"]

log = logging.getLogger("gateway.api.process")

# Serve only once jobs.status has been read, but never wait longer than this.
_CATCH_UP_S = 30.0


class _ChannelLogHandler(logging.Handler):
    """Sends each record, reduced to an event name and plain fields, to the gateway."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                k: v
                for k, v in record.__dict__.items()
                if isinstance(v, str | int | float | bool | type(None))
            }
            if record.exc_info and record.exc_info[0] is not None:
                # Type only, as the JSON formatter does: exception text can carry data.
                fields["exc_type"] = record.exc_info[0].__name__
            line = LogLine(record.name, record.levelno, str(record.msg), fields)
            self._channel.send(line, droppable=True)
        except Exception:  # noqa: BLE001  # logging must never raise into the caller
            self.handleError(record)


class _Coalesced:
    """One call to the gateway at a time for an answer many requests may want at once
    (`/readyz`, `/metrics`): callers meanwhile share it, so a burst of requests costs
    the gateway's job loop one answer, not one each."""

    def __init__(self, fetch: Callable[[], Awaitable[Any]]) -> None:
        self._fetch = fetch
        self._pending: asyncio.Future[Any] | None = None

    async def __call__(self) -> Any:
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._fetch())
        return await asyncio.shield(self._pending)


async def _serve(tenant_fd: int, ops_fd: int, channel_fd: int) -> int:
    channel = await open_channel(socket.socket(fileno=channel_fd), "api")
    init = await channel.receive()
    if not isinstance(init, Init):
        return 2
    settings, job_types = init.settings, init.job_types
    configure_logging(settings.log_format, settings.log_level, handler=_ChannelLogHandler(channel))
    current = {"catalog": init.catalog}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    code = 0

    def task_failed(name: str, why: str) -> None:
        nonlocal code
        code = 1
        stop.set()

    supervisor = Supervisor(task_failed)
    status_view = StatusView(settings, supervisor=supervisor)
    outbox = Outbox(settings.kafka, supervisor, client_id=f"{settings.kafka.client_id}-producer")

    async def gateway_readiness() -> list[str]:
        try:
            reasons: list[str] = await channel.call("ready")
        except (ConnectionError, TimeoutError):
            return ["the gateway process did not answer"]
        return reasons if isinstance(reasons, list) else ["the gateway process did not answer"]

    shared_readiness = _Coalesced(gateway_readiness)

    async def readiness() -> list[str]:
        reasons = [] if status_view.caught_up.is_set() else ["API status view catching up"]
        return reasons + list(await shared_readiness())

    def denied(tenant: str, job_id: str, action: str, source: str) -> None:
        channel.send(Denied(tenant, job_id, action, source))

    tenant_api = TenantApi(
        settings=settings,
        catalog=lambda: current["catalog"],
        job_types=job_types,
        publish=outbox.send,
        status_view=status_view,
        readiness=readiness,
        on_denied=denied,
        supervisor=supervisor,
    )
    registry = CollectorRegistry(auto_describe=True)
    dlq_index = DlqIndex(settings, supervisor)
    registry.register(DlqCollector(dlq_index))
    dlq = DlqBrowser(settings, dlq_index, outbox.send)

    def admin_done(action: str, by: str, tenant: str, count: int, detail: str) -> None:
        channel.send(AdminDone(action, by, tenant, count, detail))

    admin = AdminApi(
        settings=settings,
        catalog=lambda: current["catalog"],
        tenant_figures=lambda: channel.call("tenants"),
        send=outbox.send,
        status_view=status_view,
        dlq_index=dlq_index,
        dlq=dlq,
        on_action=admin_done,
        registry=registry,
    )
    ops_api = OpsApi(
        settings=settings,
        readiness=readiness,
        render_metrics=_Coalesced(lambda: channel.call("metrics")),
        registry=registry,
        admin=admin,
    )
    servers: list[tuple[HttpServer, int]] = []
    durations = request_histogram(registry)
    if tenant_fd >= 0:
        tenant_app = RequestTimer(tenant_api.app(), durations, "tenant")
        servers.append((HttpServer(tenant_app, settings.http, supervisor, name="http"), tenant_fd))
    if ops_fd >= 0:
        ops_app = RequestTimer(ops_api.app(), durations, "ops")
        servers.append((HttpServer(ops_app, settings.http, supervisor, name="ops"), ops_fd))

    async def listen() -> None:
        # Read until the gateway closes the channel: replies to calls still under way
        # keep arriving after Stop, while requests finish. However reading ends, the
        # process stops (the gateway starts another): never serving with a dead channel.
        try:
            await read_channel()
        except Exception as exc:
            log.exception("api_channel_failed", extra={"error": type(exc).__name__})
            raise
        finally:
            stop.set()

    async def read_channel() -> None:
        while (message := await channel.receive()) is not None:
            if isinstance(message, CatalogChanged):
                current["catalog"] = message.catalog
            elif isinstance(message, ResultReady):
                status_view.observe_result(message.value, message.status)
            elif isinstance(message, Stop):
                stop.set()
        stop.set()

    listener = asyncio.create_task(listen(), name="api-channel")
    try:
        await outbox.start()
        await status_view.start()
        await tenant_api.start()
        if ops_fd >= 0:
            await dlq_index.start()
        # Serve only once jobs.status has been read (bounded): connections that waited
        # in the backlog through a restart must not be told a job does not exist.
        await first_of(_CATCH_UP_S, status_view.caught_up.wait(), stop.wait())
        if not stop.is_set():
            for server, fd in servers:
                await server.start(socket.socket(fileno=fd))
            tune_gc(settings)
            channel.send(Started())
            await stop.wait()
    except Exception as exc:  # reported to the gateway, which restarts us
        log.exception("api_process_failed", extra={"error": type(exc).__name__})
        code = 1
    finally:
        for server, _ in servers:
            await server.stop()
        await tenant_api.stop()
        await dlq.stop()
        await dlq_index.stop()
        await status_view.stop()
        await outbox.stop()
        await supervisor.close()
        listener.cancel()
        await asyncio.wait({listener})
        if not listener.cancelled() and listener.exception() is not None:
            code = 1  # the channel failed (logged): the gateway starts another
        await channel.close()
    return code


def main() -> None:
    """Entry point of `python -m gateway.api`."""
    tenant_fd, ops_fd, channel_fd = (int(arg) for arg in sys.argv[1:4])
    # Ctrl-C reaches the whole process group; the gateway decides when the API stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    sys.exit(asyncio.run(_serve(tenant_fd, ops_fd, channel_fd)))
