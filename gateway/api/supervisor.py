"""The gateway process's side of the API process: bind, start, feed, answer, supervise.

The gateway binds the listening sockets itself (the tenant port and the operators'
port): a port in use fails the start with a clear error, and if the API process dies,
connections wait in the backlog while a new one starts (with backoff). The API process
gets the sockets, one end of the channel (`gateway.api.channel`), settings without any
Vault credential and an environment without `GATEWAY_VAULT__*`, `VAULT_*` or `BAO_*`.

Everything the API process sends is checked as it arrives (see the channel); a frame
that is not a valid message, or a channel that breaks while the process lives on, gets
the process replaced. Results handed over for `GET` are dropped rather than buffered
if the API process stops reading (it reads them from `jobs.results` anyway).

This module imports no HTTP server: the job process never loads the HTTP stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from gateway.api.channel import (
    AdminDone,
    Call,
    CatalogChanged,
    Channel,
    ChannelError,
    Denied,
    Init,
    LogLine,
    Reply,
    ResultReady,
    Started,
    Stop,
)
from gateway.audit import audit_admin, audit_cross_tenant
from gateway.catalog import Catalog
from gateway.envelope import valid_id
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.records import JobStatus
from gateway.settings import Settings, VaultSettings
from gateway.tasks import Supervisor, first_of

__all__ = ["ApiProcess", "bind", "child_environ", "child_settings"]

log = logging.getLogger("gateway.api.process")

Answer = Callable[[], Awaitable[Any]]

# Start-up includes reading jobs.status (bounded in the API process) before serving.
_STARTUP_TIMEOUT_S = 60.0
_LISTEN_BACKLOG = 2048
_RESTART_BACKOFF_S = (0.5, 30.0)  # first and longest wait before a restart
_HEALTHY_AFTER_S = 60.0  # a process that ran this long restarts without waiting
_SECRET_ENV_PREFIXES = ("GATEWAY_VAULT__", "VAULT_", "BAO_")
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


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The gateway's environment without anything that could carry Vault credentials
    (`GATEWAY_VAULT__*`, and the `VAULT_*`/`BAO_*` variables the CLIs read)."""
    return {
        key: value
        for key, value in environ.items()
        if not key.upper().startswith(_SECRET_ENV_PREFIXES)
    }


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
        self._proc: asyncio.subprocess.Process | None = None
        self._channel: Channel | None = None
        self._readers: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.port: int | None = None
        self.ops_port: int | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The API process's PID while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

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
            await self._spawn()
        except BaseException:
            await self.stop()
            raise
        self._supervisor = self._tasks.spawn(self._supervise(), "gateway:api-supervisor")
        log.info(
            "api_process_started",
            extra={"pid": self.pid, "port": self.port, "ops_port": self.ops_port},
        )

    def catalog_changed(self) -> None:
        """Send the reloaded catalog (keys, allowed types) to the API process."""
        if self._channel is not None:
            self._channel.send(CatalogChanged(self._catalog()))

    def forward_result(self, value: bytes, status: JobStatus) -> None:
        """A job this replica finished: GET answers with its result at once. Dropped if
        the API process is not reading (it reads jobs.results itself)."""
        if self._channel is not None:
            self._channel.send(ResultReady(value, status), droppable=True)

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        fds = {name: sock.fileno() for name, sock in self._sockets.items()}
        argv = [str(fds.get("tenant", -1)), str(fds.get("ops", -1)), str(theirs.fileno())]
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.api",
                *argv,
                pass_fds=(*fds.values(), theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                env=child_environ(os.environ),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._proc = proc
        try:
            channel = await Channel.open(ours, "gateway")
        except BaseException:
            ours.close()
            raise
        self._channel = channel
        started = asyncio.Event()
        reader = asyncio.create_task(self._serve_channel(channel, proc, started), name="api-chan")
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        channel.send(Init(child_settings(self._settings), self._catalog(), frozenset(self._types)))
        await first_of(_STARTUP_TIMEOUT_S, started.wait(), proc.wait())
        if not started.is_set():
            raise ConfigError("HTTP API process did not start (see its log lines above)")

    async def _serve_channel(
        self, channel: Channel, proc: asyncio.subprocess.Process, started: asyncio.Event
    ) -> None:
        # Everything here comes from the process facing the network: decoded and checked
        # by the channel, then checked again against the catalog.
        try:
            while (message := await channel.receive()) is not None:
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
                elif isinstance(message, Call):
                    self._answer(channel, message)
                elif isinstance(message, Started):
                    started.set()
        except ChannelError as exc:
            log.error("api_channel_bad_message", extra={"error": str(exc)[:200]})
        if proc.returncode is None and not self._stopping.is_set():
            # The channel broke (or carried garbage) while the process lives on: replace it.
            log.error("api_channel_closed", extra={"pid": proc.pid})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _denied(self, denied: Denied) -> None:
        if self._catalog().get(denied.tenant) is None or not valid_id(denied.job_id):
            return
        source = denied.source[:_SOURCE_PATTERN]
        audit_cross_tenant(
            tenant=denied.tenant, job_id=denied.job_id, action=denied.action, source=source
        )
        caller = self._metrics.tenant(denied.tenant)
        self._metrics.cross_tenant_denials.labels(tenant=caller, action=denied.action).inc()

    def _answer(self, channel: Channel, call: Call) -> None:
        answer = self._answers.get(call.op)

        async def reply() -> None:
            value: Any = None
            if answer is not None:
                try:
                    value = await answer()
                except Exception as exc:  # noqa: BLE001  # the API process answers 503
                    log.error("api_call_failed", extra={"op": call.op, "error": type(exc).__name__})
            channel.send(Reply(call.call_id, value))

        task = asyncio.create_task(reply(), name=f"api-call-{call.op}")
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _supervise(self) -> None:
        """Restart the API process if it exits while the gateway runs (with backoff)."""
        wait_s = _RESTART_BACKOFF_S[0]
        started_at = time.monotonic()
        while not self._stopping.is_set():
            proc = self._proc
            if proc is not None:
                code = await proc.wait()
                if self._stopping.is_set():
                    return
                if time.monotonic() - started_at > _HEALTHY_AFTER_S:
                    wait_s = _RESTART_BACKOFF_S[0]
                log.error("api_process_exited", extra={"exit_code": code, "restart_in_s": wait_s})
            await self._close_channel()
            await asyncio.sleep(wait_s)
            wait_s = min(wait_s * 2, _RESTART_BACKOFF_S[1])
            started_at = time.monotonic()
            try:
                await self._spawn()
            except Exception as exc:  # noqa: BLE001  # keep supervising; the next try may work
                log.error("api_process_restart_failed", extra={"error": type(exc).__name__})
                await self._kill()
                self._proc = None
                continue
            self.restarts += 1
            self._metrics.api_process_restarts.inc()
            log.warning("api_process_restarted", extra={"pid": self.pid, "restarts": self.restarts})

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """Ask the API process to stop (requests under way finish, bounded), then close the
        ports; idempotent."""
        self._stopping.set()
        supervisor, self._supervisor = self._supervisor, None
        await self._tasks.cancel(supervisor)
        proc, channel = self._proc, self._channel
        if proc is not None and proc.returncode is None:
            if channel is not None:
                channel.send(Stop())
            bound = self._settings.http.shutdown_timeout_s + 5.0
            try:
                await asyncio.wait_for(proc.wait(), bound)
            except TimeoutError:
                log.warning("api_process_killed", extra={"after_s": bound})
                await self._kill()
        if proc is not None:
            log.info("api_process_stopped", extra={"exit_code": proc.returncode})
        await self._close_channel()
        for task in list(self._readers):
            task.cancel()
        if self._readers:
            await asyncio.wait(set(self._readers))
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def _write_line(line: LogLine) -> None:
    """Write a line of the API process through this process's logging (one stream)."""
    logger = logging.getLogger(line.logger)
    if logger.isEnabledFor(line.level):
        logger.log(line.level, line.event, extra={**line.fields, "origin": "api"})
