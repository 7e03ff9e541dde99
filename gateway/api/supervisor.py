"""The gateway process's side of the API process: bind, start, feed, answer, supervise.

The gateway binds the listening sockets itself (the tenant port and the operators'
port): a port in use fails the start with a clear error, and if the API process dies,
connections wait in the backlog while a new one starts (with backoff: the supervision
is `gateway.child`'s, shared with the workers of `--workers N`). The API process
gets the sockets, one end of the channel (`gateway.api.channel`), settings without any
Vault credential and an environment without `GATEWAY_VAULT__*`, `VAULT_*` or `BAO_*`.

Everything the API process sends is checked as it arrives (see the channel); a frame
that is not a valid message, or a channel that breaks while the process lives on, gets
the process replaced. Results handed over for `GET` are dropped rather than buffered
if the API process stops reading (it reads them from `jobs.results` anyway).

This module imports no HTTP server: the job process never loads the HTTP stack.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Collection, Mapping

from gateway.api.channel import (
    AdminDone,
    CatalogChanged,
    Denied,
    Init,
    LogLine,
    ResultReady,
    codec,
)
from gateway.audit import audit_admin, audit_cross_tenant
from gateway.catalog import Catalog
from gateway.channel import Answer
from gateway.child import Child
from gateway.envelope import valid_id
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.records import JobStatus
from gateway.settings import Settings, VaultSettings
from gateway.tasks import Supervisor

__all__ = ["ApiProcess", "bind", "child_settings"]

log = logging.getLogger("gateway.api.process")

# Start-up includes reading jobs.status (bounded in the API process) before serving.
_STARTUP_TIMEOUT_S = 60.0
_LISTEN_BACKLOG = 2048
_SOURCE_PATTERN = 64  # longest "host:port" a denial may name


def bind(host: str, port: int, what: str = "HTTP API") -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only
    # on sockets that say they are TCP. Without it every answer (headers, then body in a
    # second write) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{what} cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def child_settings(settings: Settings) -> Settings:
    """What the API process is given: the gateway's settings without Vault credentials."""
    kafka = settings.kafka.model_copy(update={"client_id": f"{settings.kafka.client_id}-api"})
    return settings.model_copy(update={"vault": VaultSettings(enabled=False), "kafka": kafka})


class ApiProcess:
    """Starts, feeds, answers and supervises the API process of one gateway."""

    def __init__(
        self,
        settings: Settings,
        catalog: Callable[[], Catalog],
        job_types: Collection[str],
        *,
        answers: Mapping[str, Answer],
        metrics: Metrics,
        supervisor: Supervisor,
    ) -> None:
        self._settings = settings
        self._catalog = catalog  # the one in force, read at each use
        self._types = job_types  # read at each start: types registered late count
        self._answers = answers
        self._metrics = metrics
        self._tasks = supervisor
        self._sockets: dict[str, socket.socket] = {}
        self._child: Child | None = None
        self.port: int | None = None
        self.ops_port: int | None = None

    @property
    def pid(self) -> int | None:
        """The API process's PID while it runs."""
        return self._child.pid if self._child is not None else None

    @property
    def restarts(self) -> int:
        """Times the API process exited and was started again."""
        return self._child.restarts if self._child is not None else 0

    async def start(self) -> None:
        """Bind the ports (a clear error if taken), start the API process and wait until it
        accepts connections."""
        http, ops = self._settings.http, self._settings.ops
        try:
            if http.enabled:
                self._sockets["tenant"] = bind(http.host, http.port, "the HTTP API")
                self.port = int(self._sockets["tenant"].getsockname()[1])
            if ops.enabled:
                self._sockets["ops"] = bind(ops.host, ops.port, "the ops listener")
                self.ops_port = int(self._sockets["ops"].getsockname()[1])
            for sock in self._sockets.values():
                sock.listen(_LISTEN_BACKLOG)
            fds = [
                self._sockets[name].fileno() if name in self._sockets else -1
                for name in ("tenant", "ops")
            ]
            self._child = Child(
                "HTTP API process",
                "api_process",
                "gateway.api",
                codec=codec("gateway"),
                channel_name="api",
                greeting=lambda: Init(
                    child_settings(self._settings), self._catalog(), frozenset(self._types)
                ),
                on_message=self._on_message,
                tasks=self._tasks,
                logger=log,
                start_timeout_s=_STARTUP_TIMEOUT_S,
                stop_timeout_s=self._settings.http.shutdown_timeout_s + 5.0,
                fds=fds,
                answers=self._answers,
                on_restart=self._metrics.api_process_restarts.inc,
            )
            await self._child.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "api_process_started",
            extra={"pid": self.pid, "port": self.port, "ops_port": self.ops_port},
        )

    def catalog_changed(self) -> None:
        """Send the reloaded catalog (keys, allowed types) to the API process."""
        channel = self._child.channel if self._child is not None else None
        if channel is not None:
            channel.send(CatalogChanged(self._catalog()))

    def forward_result(self, value: bytes, status: JobStatus) -> None:
        """A job this replica finished: GET answers with its result at once. Dropped if
        the API process is not reading (it reads jobs.results itself)."""
        channel = self._child.channel if self._child is not None else None
        if channel is not None:
            channel.send(ResultReady(value, status), droppable=True)

    def _on_message(self, message: object) -> None:
        # Everything here comes from the process facing the network: decoded and checked
        # by the channel, then checked again against the catalog.
        if isinstance(message, LogLine):
            _write_line(message)
        elif isinstance(message, Denied):
            self._denied(message)
        elif isinstance(message, AdminDone):
            audit_admin(
                action=message.action,
                by=message.by,
                tenant=message.tenant,
                count=message.count,
                detail=message.detail,
            )

    def _denied(self, denied: Denied) -> None:
        if self._catalog().get(denied.tenant) is None or not valid_id(denied.job_id):
            return
        source = denied.source[:_SOURCE_PATTERN]
        audit_cross_tenant(
            tenant=denied.tenant, job_id=denied.job_id, action=denied.action, source=source
        )
        caller = self._metrics.tenant(denied.tenant)
        self._metrics.cross_tenant_denials.labels(tenant=caller, action=denied.action).inc()

    async def stop(self) -> None:
        """Ask the API process to stop (requests under way finish, bounded), then close the
        ports; idempotent."""
        if self._child is not None:
            await self._child.stop()
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def _write_line(line: LogLine) -> None:
    """Write a line of the API process through this process's logging (one stream)."""
    logger = logging.getLogger(line.logger)
    if logger.isEnabledFor(line.level):
        logger.log(line.level, line.event, extra={**line.fields, "origin": "api"})
