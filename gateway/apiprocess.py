"""The HTTP control API in a process of its own, started and supervised by the gateway.

Why a process: in a thread of the job process, every answer waited for the interpreter
lock behind the job loop, and under 500 jobs/s the p99 of `GET /v1/jobs/{id}` was
20-60 ms; served from its own process, the same benchmark gives about 5 ms (BENCHMARKS.md).
Everything the API reads or writes already works over Kafka: it runs its own status
view (`jobs.status` and `jobs.results`) and its own producer. The rest goes through one
channel (a socket pair carrying pickled tuples) to the gateway process:

- at start, the settings (without Vault credentials: the API process never talks to
  Vault), the catalog and the names of the job types; later, every reloaded catalog;
- `/readyz` and `/metrics` ask the gateway (its readiness, its registry);
- each cross-tenant denial is counted in the gateway's registry;
- every log record is re-emitted through the gateway's logging, so there is one
  stream, one format and one place to route the audit log.

The gateway binds the listening socket and keeps it: a port in use fails the start
with a clear error, and if the API process dies, connections wait in the backlog
while a new one starts (with backoff). The API process exits when the channel closes,
so it never outlives the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from gateway.api import ControlApi
from gateway.catalog import Catalog
from gateway.errors import ConfigError
from gateway.history import TerminalHistory
from gateway.httpserver import HttpServer, bind
from gateway.memory import tune_gc
from gateway.metrics import Metrics
from gateway.observability import configure_logging
from gateway.publisher import Publisher
from gateway.settings import Settings, VaultSettings
from gateway.statusview import StatusView

__all__ = ["ApiProcess", "Channel", "child_settings", "main"]

log = logging.getLogger("gateway.api.process")

Readiness = Callable[[], Any]  # () -> awaitable list[str]

_HEADER = struct.Struct(">I")
_MAX_FRAME = 256 * 1024 * 1024
_STARTUP_TIMEOUT_S = 30.0
_CALL_TIMEOUT_S = 10.0
_LISTEN_BACKLOG = 2048
_RESTART_BACKOFF_S = (0.5, 30.0)  # first and longest wait before a restart
_HEALTHY_AFTER_S = 60.0  # a process that ran this long restarts without waiting


class Channel:
    """Length-prefixed pickled tuples over one end of a socket pair, with calls.

    Both ends are this package's own code in processes it started, so pickle is safe.
    `send` only buffers (it never blocks the loop); `call` sends `("call", id, op)`
    and waits for the matching `("reply", id, value)`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue one message (from any thread); dropped once the channel is closed."""
        if threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self.send, message)
            return
        if self.closed or self._writer.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_HEADER.pack(len(data)) + data)

    async def receive(self) -> tuple[Any, ...] | None:
        """The next message, or None once the other end has closed."""
        message: tuple[Any, ...] | None = None
        try:
            size = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))[0]
            if size <= _MAX_FRAME:
                message = pickle.loads(await self._reader.readexactly(size))  # noqa: S301  # our own child
            else:
                log.error("api_channel_frame_too_large", extra={"bytes": size})
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if message is None:
            self._close_calls()
        return message

    async def call(self, op: str) -> Any:
        """Ask the other end; raises ConnectionError if it is gone, TimeoutError if slow."""
        if self.closed:
            raise ConnectionError("channel closed")
        self._next_id += 1
        call_id = self._next_id
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = future
        try:
            self.send(("call", call_id, op))
            return await asyncio.wait_for(future, _CALL_TIMEOUT_S)
        finally:
            self._calls.pop(call_id, None)

    def resolve(self, call_id: int, value: Any) -> None:
        """Complete a call with the other end's reply."""
        future = self._calls.get(call_id)
        if future is not None and not future.done():
            future.set_result(value)

    def _close_calls(self) -> None:
        self.closed = True
        for future in self._calls.values():
            if not future.done():
                future.set_exception(ConnectionError("channel closed"))

    async def close(self) -> None:
        self._close_calls()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


# -- the gateway's side ---------------------------------------------------------------


def child_settings(settings: Settings) -> Settings:
    """What the API process is given: the gateway's settings without Vault credentials."""
    # The API process never reads secrets: it gets no Vault credentials at all.
    kafka = settings.kafka.model_copy(update={"client_id": f"{settings.kafka.client_id}-api"})
    return settings.model_copy(update={"vault": VaultSettings(enabled=False), "kafka": kafka})


class ApiProcess:
    """Starts, feeds, answers and supervises the API process of one gateway."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        job_types: Collection[str],
        *,
        readiness: Readiness,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._types = job_types  # read at each start: types registered late count
        self._readiness = readiness
        self._metrics = metrics
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._channel: Channel | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.port: int | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The API process's PID while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def start(self) -> None:
        """Bind the port (a clear error if taken), start the API process and wait until it
        accepts connections."""
        http = self._settings.http
        self._sock = bind(http.host, http.port)
        self._sock.listen(_LISTEN_BACKLOG)
        self.port = int(self._sock.getsockname()[1])
        try:
            await self._spawn()
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="gateway-api-supervisor")
        log.info("api_process_started", extra={"pid": self.pid, "port": self.port})

    def update_catalog(self, catalog: Catalog) -> None:
        """Send a reloaded catalog (keys, allowed types) to the API process."""
        self._catalog = catalog
        if self._channel is not None:
            self._channel.send(("catalog", catalog))

    async def _spawn(self) -> None:
        assert self._sock is not None
        ours, theirs = socket.socketpair()
        listen_fd, channel_fd = self._sock.fileno(), theirs.fileno()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.apiprocess",
                str(listen_fd),
                str(channel_fd),
                pass_fds=(listen_fd, channel_fd),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._proc = proc
        channel = await Channel.open(ours)
        self._channel = channel
        started = asyncio.Event()
        self._keep(self._serve_channel(channel, started), "gateway-api-channel")
        channel.send(
            ("init", child_settings(self._settings), self._catalog, frozenset(self._types))
        )
        waiter = asyncio.ensure_future(started.wait())
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait(
                {waiter, exited}, timeout=_STARTUP_TIMEOUT_S, return_when="FIRST_COMPLETED"
            )
        finally:
            waiter.cancel()
            exited.cancel()
        if not started.is_set():
            raise ConfigError("HTTP API process did not start (see its log lines above)")

    def _keep(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_channel(self, channel: Channel, started: asyncio.Event) -> None:
        while (message := await channel.receive()) is not None:
            tag = message[0]
            if tag == "log":
                _reemit(message[1])
            elif tag == "denied":
                _, tenant, action = message
                self._metrics.cross_tenant_denials.labels(tenant=tenant, action=action).inc()
            elif tag == "call":
                self._keep(self._answer(channel, message[1], message[2]), "gateway-api-answer")
            elif tag == "reply":
                channel.resolve(message[1], message[2])
            elif tag == "started":
                started.set()

    async def _answer(self, channel: Channel, call_id: int, op: str) -> None:
        value: Any
        if op == "ready":
            value = await self._readiness()
        elif op == "metrics":
            value = self._metrics.render()
        else:
            value = None
        channel.send(("reply", call_id, value))

    async def _supervise(self) -> None:
        """Restart the API process if it exits while the gateway runs (with backoff)."""
        wait_s = _RESTART_BACKOFF_S[0]
        while not self._stopping.is_set():
            proc = self._proc
            started_at = time.monotonic()
            if proc is not None:
                code = await proc.wait()
                if self._stopping.is_set():
                    return
                log.error("api_process_exited", extra={"exit_code": code, "restart_in_s": wait_s})
                if time.monotonic() - started_at > _HEALTHY_AFTER_S:
                    wait_s = _RESTART_BACKOFF_S[0]
            await self._close_channel()
            await asyncio.sleep(wait_s)
            wait_s = min(wait_s * 2, _RESTART_BACKOFF_S[1])
            try:
                await self._spawn()
            except (ConfigError, OSError) as exc:
                log.error("api_process_restart_failed", extra={"error": type(exc).__name__})
                await self._kill()
                continue
            self.restarts += 1
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
        port; idempotent."""
        self._stopping.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.wait({supervisor})
        proc, channel = self._proc, self._channel
        if proc is not None and proc.returncode is None:
            if channel is not None:
                channel.send(("stop",))
            bound = self._settings.http.shutdown_timeout_s + 5.0
            try:
                await asyncio.wait_for(proc.wait(), bound)
            except TimeoutError:
                log.warning("api_process_killed", extra={"after_s": bound})
                await self._kill()
        if proc is not None:
            log.info("api_process_stopped", extra={"exit_code": proc.returncode})
        await self._close_channel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _reemit(fields: dict[str, Any]) -> None:
    record = logging.makeLogRecord(fields)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


# -- the API process's side ---------------------------------------------------------


class _ChannelLogHandler(logging.Handler):
    """Sends each record, flattened to plain values, to the gateway to be emitted there."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {k: v for k, v in record.__dict__.items() if _plain(v)}
            fields["msg"] = record.getMessage()
            fields["args"] = None
            fields.pop("exc_info", None)
            fields.pop("exc_text", None)
            if record.exc_info and record.exc_info[0] is not None:
                # Type only, as the JSON formatter does: exception text can carry data.
                fields["exc_type"] = record.exc_info[0].__name__
            self._channel.send(("log", fields))
        except Exception:  # noqa: BLE001  # logging must never raise into the caller
            self.handleError(record)


def _plain(value: Any) -> bool:
    if isinstance(value, str | int | float | bool | type(None)):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


async def _serve(listen_fd: int, channel_fd: int) -> int:
    channel = await Channel.open(socket.socket(fileno=channel_fd))
    init = await channel.receive()
    if init is None or init[0] != "init":
        return 2
    settings: Settings
    _, settings, catalog, job_types = init
    configure_logging(settings.log_format, settings.log_level, handler=_ChannelLogHandler(channel))
    current = {"catalog": catalog}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    status_view = StatusView(
        settings.kafka,
        settings.topics.status,
        TerminalHistory(settings.history_size),
        settings.history_size,
        results_topic=settings.topics.results,
        result_cache_bytes=settings.http.result_cache_bytes,
    )
    publisher = Publisher(settings.kafka)

    async def readiness() -> list[str]:
        reasons = [] if status_view.caught_up.is_set() else ["API status view catching up"]
        try:
            reasons.extend(await channel.call("ready"))
        except (ConnectionError, TimeoutError):
            reasons.append("the gateway process did not answer")
        return reasons

    async def render_metrics() -> bytes:
        rendered: bytes = await channel.call("metrics")
        return rendered

    api = ControlApi(
        settings=settings,
        catalog=lambda: current["catalog"],
        job_types=job_types,
        publish=publisher.send,
        status_view=status_view,
        readiness=readiness,
        render_metrics=render_metrics,
        on_denied=lambda tenant, action: channel.send(("denied", tenant, action)),
    )
    server = HttpServer(api.app(), settings.http)

    async def listen() -> None:
        while (message := await channel.receive()) is not None:
            if message[0] == "catalog":
                current["catalog"] = message[1]
            elif message[0] == "reply":
                channel.resolve(message[1], message[2])
            elif message[0] == "stop":
                break
        stop.set()

    listener = asyncio.create_task(listen(), name="api-channel")
    code = 0
    try:
        await publisher.start()
        await status_view.start()
        await server.start(socket.socket(fileno=listen_fd))
        tune_gc(settings)
        channel.send(("started",))
        await stop.wait()
    except Exception as exc:  # reported to the gateway, which restarts us
        log.exception("api_process_failed", extra={"error": type(exc).__name__})
        code = 1
    finally:
        await server.stop()
        await status_view.stop()
        await publisher.stop()
        listener.cancel()
        await asyncio.wait({listener})
        await channel.close()
    return code


def main() -> None:
    """`python -m gateway.apiprocess LISTEN_FD CHANNEL_FD`, started by `ApiProcess`."""
    listen_fd, channel_fd = int(sys.argv[1]), int(sys.argv[2])
    # Ctrl-C reaches the whole process group; the gateway decides when the API stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(asyncio.run(_serve(listen_fd, channel_fd)))


if __name__ == "__main__":
    main()
