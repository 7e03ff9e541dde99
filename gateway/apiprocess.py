"""The HTTP control API in a process of its own, started and supervised by the gateway.

Why a process: in a thread of the job process, every answer waited for the interpreter
lock behind the job loop, and under 500 jobs/s the p99 of `GET /v1/jobs/{id}` was
20-60 ms; served from its own process, the same benchmark gives about 5 ms (BENCHMARKS.md).
Everything the API reads or writes already works over Kafka: it runs its own status
view (`jobs.status` and `jobs.results`) and its own producer. The rest goes through one
channel (a socket pair: pickles from the gateway, JSON from the API process) to the
gateway process:

- at start, the settings (without Vault credentials: the API process never talks to
  Vault), the catalog and the names of the job types; later, every reloaded catalog
  and the result of every job the gateway finishes;
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
import ctypes
import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from gateway.api import ControlApi
from gateway.catalog import Catalog
from gateway.errors import ConfigError
from gateway.httpserver import HttpServer, bind
from gateway.memory import tune_gc
from gateway.metrics import Metrics
from gateway.observability import configure_logging
from gateway.publisher import Publisher
from gateway.settings import Settings, VaultSettings
from gateway.statusview import JobStatus, StatusView

__all__ = ["ApiProcess", "Channel", "child_settings", "main"]

log = logging.getLogger("gateway.api.process")

Readiness = Callable[[], Awaitable[list[str]]]

_HEADER = struct.Struct(">I")
_MAX_FRAME = 256 * 1024 * 1024
_MAX_BUFFERED_BYTES = 8 * 1024 * 1024  # unsent log records past this are dropped
# Start-up includes reading jobs.status (bounded by _CATCH_UP_S) before serving.
_STARTUP_TIMEOUT_S = 60.0
_CATCH_UP_S = 30.0
_CALL_TIMEOUT_S = 10.0
_LISTEN_BACKLOG = 2048
_RESTART_BACKOFF_S = (0.5, 30.0)  # first and longest wait before a restart
_HEALTHY_AFTER_S = 60.0  # a process that ran this long restarts without waiting
_SECRET_ENV_PREFIXES = ("GATEWAY_VAULT__", "VAULT_", "BAO_")
_ACTIONS = ("get", "cancel")
_PR_SET_PDEATHSIG = 1


class Channel:
    """Length-prefixed messages (tuples) over one end of a socket pair, with calls.

    The gateway sends pickles (settings, catalog: it is the trusted side) and reads only
    JSON, so even a compromised API process cannot make the gateway run code. `send`
    only buffers (it never blocks the loop; droppable messages such as log records are
    dropped past `_MAX_BUFFERED_BYTES` if the other side stalls); `call` sends
    `("call", id, op)` and waits for the matching `("reply", id, value)`.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        send_pickles: bool,
        read_pickles: bool,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._send_pickles = send_pickles
        self._read_pickles = read_pickles
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket, *, send_pickles: bool, read_pickles: bool) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, send_pickles=send_pickles, read_pickles=read_pickles)

    def send(self, message: tuple[Any, ...], *, droppable: bool = False) -> None:
        """Queue one message (from any thread); dropped once the channel is closed."""
        if threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(lambda: self.send(message, droppable=droppable))
            return
        if self.closed or self._writer.is_closing():
            return
        if droppable and self._writer.transport.get_write_buffer_size() > _MAX_BUFFERED_BYTES:
            return  # nowhere to report it: this channel is the way out, and it is full
        if self._send_pickles:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            data = json.dumps(message, separators=(",", ":")).encode()
        self._writer.write(_HEADER.pack(len(data)) + data)

    async def receive(self) -> tuple[Any, ...] | None:
        """The next message, or None once the other end has closed (or sent garbage)."""
        message: tuple[Any, ...] | None = None
        try:
            size = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))[0]
            if size <= _MAX_FRAME:
                message = self._decode(await self._reader.readexactly(size))
            else:
                log.error("api_channel_bad_message", extra={"error": f"{size} bytes"})
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except ValueError as exc:  # JSONDecodeError too
            log.error("api_channel_bad_message", extra={"error": type(exc).__name__})
        if message is None:
            self._close_calls()
        return message

    def _decode(self, data: bytes) -> tuple[Any, ...] | None:
        if self._read_pickles:
            return tuple(pickle.loads(data))  # noqa: S301  # only ever from the gateway
        decoded = json.loads(data)
        if isinstance(decoded, list) and decoded and isinstance(decoded[0], str):
            return tuple(decoded)
        log.error("api_channel_bad_message", extra={"error": "not a message"})
        return None

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
        readiness: Readiness,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._catalog = catalog  # the one in force, read at each use
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

    def catalog_changed(self) -> None:
        """Send the reloaded catalog (keys, allowed types) to the API process."""
        if self._channel is not None:
            self._channel.send(("catalog", self._catalog()))

    def forward_result(self, value: bytes, status: JobStatus) -> None:
        """A job this replica finished: the API answers GET with its result at once,
        without waiting to read it back from Kafka."""
        if self._channel is not None:
            self._channel.send(("result", value, status))

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
                env=child_environ(os.environ),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._proc = proc
        try:
            channel = await Channel.open(ours, send_pickles=True, read_pickles=False)
        except BaseException:
            ours.close()
            raise
        self._channel = channel
        started = asyncio.Event()
        self._keep(self._serve_channel(channel, proc, started), "gateway-api-channel")
        channel.send(
            ("init", child_settings(self._settings), self._catalog(), frozenset(self._types))
        )
        await _first_of(_STARTUP_TIMEOUT_S, started.wait(), proc.wait())
        if not started.is_set():
            raise ConfigError("HTTP API process did not start (see its log lines above)")

    def _keep(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_channel(
        self, channel: Channel, proc: asyncio.subprocess.Process, started: asyncio.Event
    ) -> None:
        # Everything here comes from the API process, the one facing the network: it is
        # checked as input (JSON only, known tags, catalog tenants, known actions).
        while (message := await channel.receive()) is not None:
            tag = message[0]
            if tag == "log" and len(message) == 2 and isinstance(message[1], dict):
                _reemit(message[1])
            elif tag == "denied" and len(message) == 3:
                _, tenant, action = message
                if self._catalog().get(str(tenant)) is not None and action in _ACTIONS:
                    self._metrics.cross_tenant_denials.labels(tenant=tenant, action=action).inc()
            elif tag == "call" and len(message) == 3 and isinstance(message[1], int):
                self._keep(self._answer(channel, message[1], message[2]), "gateway-api-answer")
            elif tag == "started":
                started.set()
        if proc.returncode is None and not self._stopping.is_set():
            # The channel broke while the process lives on: replace the process.
            log.error("api_channel_closed", extra={"pid": proc.pid})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _answer(self, channel: Channel, call_id: int, op: object) -> None:
        value: Any = None
        if op == "ready":
            value = await self._readiness()
        elif op == "metrics":
            value = self._metrics.render()
        channel.send(("reply", call_id, value))

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


async def _first_of(timeout_s: float, *waits: Awaitable[Any]) -> None:
    """Return once any of `waits` is done or `timeout_s` has passed; the rest are cancelled."""
    futures = {asyncio.ensure_future(wait) for wait in waits}
    try:
        await asyncio.wait(futures, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()


def _reemit(fields: dict[str, Any]) -> None:
    try:
        record = logging.makeLogRecord(fields)
        logger = logging.getLogger(str(record.name))
        if logger.isEnabledFor(int(record.levelno)):
            logger.handle(record)
    except Exception:  # noqa: BLE001  # a malformed record is dropped, never raised
        log.warning("api_log_record_dropped")


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
            self._channel.send(("log", fields), droppable=True)
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


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the gateway process ends, even before the channel is read."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def _serve(listen_fd: int, channel_fd: int) -> int:
    channel = await Channel.open(
        socket.socket(fileno=channel_fd), send_pickles=False, read_pickles=True
    )
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
        settings.history_size,
        results_topic=settings.topics.results,
        result_cache_bytes=settings.http.result_cache_bytes,
    )
    publisher = Publisher(settings.kafka)

    async def gateway_readiness() -> list[str]:
        try:
            reasons: list[str] = await channel.call("ready")
        except (ConnectionError, TimeoutError):
            return ["the gateway process did not answer"]
        return reasons

    shared_readiness = _Coalesced(gateway_readiness)

    async def readiness() -> list[str]:
        reasons = [] if status_view.caught_up.is_set() else ["API status view catching up"]
        return reasons + list(await shared_readiness())

    render_metrics = _Coalesced(lambda: channel.call("metrics"))

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
        # Read until the gateway closes the channel: replies to calls still under way
        # keep arriving after "stop", while requests finish.
        while (message := await channel.receive()) is not None:
            if message[0] == "catalog":
                current["catalog"] = message[1]
            elif message[0] == "result":
                status_view.observe_result(message[1], message[2])
            elif message[0] == "reply":
                channel.resolve(message[1], message[2])
            elif message[0] == "stop":
                stop.set()
        stop.set()

    listener = asyncio.create_task(listen(), name="api-channel")
    code = 0
    try:
        await publisher.start()
        await status_view.start()
        # Serve only once jobs.status has been read (bounded): connections that waited
        # in the backlog through a restart must not be told a job does not exist.
        await _first_of(_CATCH_UP_S, status_view.caught_up.wait(), stop.wait())
        if not stop.is_set():
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
    _die_with_parent()
    sys.exit(asyncio.run(_serve(listen_fd, channel_fd)))


if __name__ == "__main__":
    main()
