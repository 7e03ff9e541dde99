"""`FaultProxy`: a loopback TCP proxy that injects network faults on command.

The proxy runs its own asyncio event loop in a daemon thread, so it keeps forwarding
while the thread that controls it is blocked (in `subprocess.wait`, a blocking socket
call, or an event loop that is busy). Every control method may be called from any
thread except the proxy's own; it returns once the change is in effect.

Each accepted connection gets its own connection to the target and two one-way pumps
(client to target is "up", target to client is "down"). A pump is a reader that stamps
every chunk with the time it may be delivered and a writer that delivers chunks in
order, honouring that time (latency) and the bandwidth limit (throttle). The queue
between them is bounded, so a slow writer stops the reader, which stops reading the
socket, which pushes back on the sender through TCP, as a real slow link would. A
half-close (EOF) is forwarded as a half-close; a reset is forwarded as a reset.

Faults, in order of precedence when several are on at once:

* `refuse()`: the listening socket is closed (clients get ECONNREFUSED) and every open
  connection is reset; turning it off listens again on the same port.
* `blackhole()`: connections stay open and new ones are accepted, but nothing is
  delivered either way. Bytes that arrive are read and discarded (dropped, not held),
  so senders never block; a black-holed connection's EOF or reset is not passed on
  either (as in a partition, the far side never learns). New connections accepted
  during a blackhole get no connection to the target at all. When the blackhole is
  lifted, every connection that was black-holed is reset (its byte stream has a hole
  in it, so it cannot be resumed); new connections are forwarded normally.
* `http_error(status)`: the next request on any connection (new or kept alive) is
  answered by the proxy with that status and a small JSON body, `Connection: close`,
  and the connection is closed; the connection to the target is closed too and the
  request is never forwarded.
* `latency(seconds)` and `throttle(bytes_per_s)` shape every chunk forwarded.

`reset()` resets every open connection once; `heal()` turns every fault off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = ["FaultProxy"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_HOST = "127.0.0.1"
_CHUNK = 64 * 1024  # bytes read at once from a socket
_QUEUE_CHUNKS = 16  # chunks a pump holds between its reader and its writer
_THROTTLE_SLICES_PER_S = 20  # a throttled chunk is written in slices of rate/20 bytes
_CONTROL_TIMEOUT_S = 5.0  # a control call waits at most this long for the proxy's loop
_CONNECT_TIMEOUT_S = 5.0  # connecting to the target
_CLOSE_TIMEOUT_S = 2.0  # a graceful close, or the end of connections after a reset
_HTTP_READ_TIMEOUT_S = 1.0  # reading the rest of a request that gets an injected error
_HTTP_LINGER_S = 2.0  # waiting for the client to close after an injected error
_JOIN_TIMEOUT_S = 5.0  # joining the proxy's thread in stop()
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

_Chunk = tuple[float, bytes]  # (deliver at, in time.monotonic() seconds; data)


def _send_rst(transport: asyncio.WriteTransport) -> None:
    """Abort `transport` so that its socket closes with a TCP RST, not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


async def _sleep_until(deadline: float) -> None:
    """Sleep until `time.monotonic()` reaches `deadline` (the loop's clock is the same)."""
    remaining = deadline - time.monotonic()
    if remaining > 0:
        await asyncio.sleep(remaining)


def _http_request_complete(buffer: bytes) -> bool:
    """True when `buffer` holds a whole HTTP request head and its body (as far as a
    `Content-Length` or the final chunk of a chunked body tells)."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    body = len(buffer) - head_end - 4
    for line in buffer[:head_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                return body >= int(value.strip())
            except ValueError:
                return True
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            return buffer.endswith(b"0\r\n\r\n")
    return True


def _http_error_response(status: int) -> bytes:
    """The whole response the proxy sends for an injected HTTP error."""
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Injected Fault"
    body = json.dumps({"errors": ["injected fault"]}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


class _Connection:
    """One proxied connection: the client's stream, the target's, and the pump tasks."""

    def __init__(self, client: asyncio.StreamWriter, task: asyncio.Task[Any]) -> None:
        self.client = client
        self.task = task  # the task serving the connection
        self.upstream: asyncio.StreamWriter | None = None
        self.blackholed = False
        self.answering = False  # an injected HTTP error is being sent: forward nothing
        self.closed = False  # reset: everything aborted
        self.tasks: set[asyncio.Task[None]] = set()
        self.released = asyncio.Event()  # set by reset(): a black-holed connection ends

    def reset(self) -> None:
        """Reset both sides now (RST) and cancel the pumps; idempotent."""
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.upstream):
            if writer is not None:
                _send_rst(writer.transport)
        self.stop_pumps()
        self.released.set()

    def stop_pumps(self) -> None:
        """Cancel every pump task except the calling one."""
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        """Close both sides gracefully (FIN after pending data), bounded; then abort."""
        writers = [w for w in (self.client, self.upstream) if w is not None]
        for writer in writers:
            if not writer.transport.is_closing():
                writer.close()
        for writer in writers:
            try:
                await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT_S)
            except (OSError, TimeoutError):
                writer.transport.abort()


class FaultProxy:
    """A loopback TCP proxy to `target_host:target_port` that injects faults on command.

    Listens on 127.0.0.1 (`listen_port`, or a free port when 0). Use as a context
    manager, or call `start()` and `stop()` (both idempotent). The counters
    `connections_total`, `connections_open`, `bytes_up` (delivered to the target) and
    `bytes_down` (delivered to clients) may be read from any thread.
    """

    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0) -> None:
        self._target_host = target_host
        self._target_port = target_port
        self._port = listen_port
        self._lock = threading.Lock()  # serialises start, stop and every control call
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # State below is only touched in the proxy's thread (counters read anywhere).
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._serving: set[asyncio.Task[Any]] = set()
        self._refusing = False
        self._blackhole = False
        self._http_status: int | None = None
        self._latency_s = 0.0
        self._throttle: int | None = None
        self._connections_total = 0
        self._connections_open = 0
        self._bytes_up = 0
        self._bytes_down = 0

    def __repr__(self) -> str:
        return (
            f"FaultProxy(127.0.0.1:{self._port} -> {self._target_host}:{self._target_port}, "
            f"running={self.running})"
        )

    # -- lifecycle -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between `start()` and `stop()`."""
        return self._thread is not None

    @property
    def port(self) -> int:
        """The listening port (known once started, or when given as `listen_port`)."""
        if self._port == 0:
            raise RuntimeError("FaultProxy: the port is chosen by start()")
        return self._port

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, the address clients connect to."""
        return f"{_HOST}:{self.port}"

    @property
    def target(self) -> str:
        """`HOST:PORT` of the target."""
        return f"{self._target_host}:{self._target_port}"

    def start(self) -> None:
        """Start listening and forwarding; returns once the port accepts connections.

        A stopped proxy may be started again; it listens on the same port.
        """
        with self._lock:
            if self._thread is not None:
                return
            self._refusing = False  # a restarted proxy listens again
            loop = asyncio.new_event_loop()
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            thread = threading.Thread(
                target=self._run_loop,
                args=(loop, ready),
                name=f"fault-proxy-{self.target}",
                daemon=True,
            )
            thread.start()
            try:
                ready.result(timeout=_CONTROL_TIMEOUT_S)
            except BaseException:
                if not ready.done():  # the loop is up but did not answer: stop it
                    loop.call_soon_threadsafe(loop.stop)
                thread.join(_JOIN_TIMEOUT_S)
                raise
            self._loop, self._thread = loop, thread

    def stop(self) -> None:
        """Reset every connection, stop listening and join the thread (bounded); idempotent.

        Raises RuntimeError if the thread did not end within its bound.
        """
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            self._loop = self._thread = None
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(TimeoutError, concurrent.futures.CancelledError):
                future.result(timeout=_CONTROL_TIMEOUT_S)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_JOIN_TIMEOUT_S)
            if thread.is_alive():
                raise RuntimeError(f"{self!r}: its thread did not stop within {_JOIN_TIMEOUT_S}s")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- counters --------------------------------------------------------------------

    @property
    def connections_total(self) -> int:
        """Connections accepted since the proxy was created."""
        return self._connections_total

    @property
    def connections_open(self) -> int:
        """Accepted connections not yet closed."""
        return self._connections_open

    @property
    def bytes_up(self) -> int:
        """Bytes delivered to the target."""
        return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes delivered to clients."""
        return self._bytes_down

    # -- faults ----------------------------------------------------------------------

    def reset(self) -> None:
        """Reset every open connection now (RST to client and target); new ones are allowed."""
        self._control(self._reset_all)

    def refuse(self, on: bool = True) -> None:
        """While on, refuse new connections (ECONNREFUSED) and reset the open ones.

        Turning it off listens again on the same port.
        """
        self._control(lambda: self._set_refuse(on))

    def blackhole(self, on: bool = True) -> None:
        """While on, accept connections but deliver no byte either way (see the module
        docstring); turning it off resets the connections that were black-holed."""
        self._control(lambda: self._set_blackhole(on))

    def latency(self, seconds: float) -> None:
        """Delay every chunk forwarded either way by `seconds` (0 disables)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")

        async def apply() -> None:
            self._latency_s = float(seconds)

        self._control(apply)

    def throttle(self, bytes_per_s: int | None) -> None:
        """Limit each direction of each connection to `bytes_per_s` (None disables)."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("throttle must be a positive rate or None")

        async def apply() -> None:
            self._throttle = bytes_per_s

        self._control(apply)

    def http_error(self, status: int | None) -> None:
        """Answer every request with HTTP `status` and close (None disables); see the
        module docstring."""
        if status is not None and not 100 <= status <= 599:
            raise ValueError("HTTP status must be within 100..599")

        async def apply() -> None:
            self._http_status = status

        self._control(apply)

    def heal(self) -> None:
        """Turn every fault off (listening again if refused; black-holed connections reset)."""
        self._control(self._heal)

    # -- inside the proxy's thread ---------------------------------------------------

    def _control(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run `make()` on the proxy's loop and wait for it (bounded)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy: control calls must come from another thread")
        with self._lock:
            loop = self._loop
            if loop is None:
                raise RuntimeError(f"{self!r} is not running")
            future = asyncio.run_coroutine_threadsafe(make(), loop)
            try:
                return future.result(timeout=_CONTROL_TIMEOUT_S)
            except TimeoutError:
                future.cancel()
                raise

    def _run_loop(
        self, loop: asyncio.AbstractEventLoop, ready: concurrent.futures.Future[None]
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # noqa: BLE001  # re-raised by start()
                ready.set_exception(exc)
                return
            ready.set_result(None)
            loop.run_forever()
        finally:
            self._close_loop(loop)

    @staticmethod
    def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
        """Cancel what is left, as asyncio.run() does, and close the loop."""
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT_S))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    async def _listen(self) -> None:
        """Listen on the proxy's port (SO_REUSEADDR, so the same port can be reopened)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((_HOST, self._port))
            sock.listen(128)
            sock.setblocking(False)
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=_CHUNK)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listening socket at once
            self._server = None

    async def _reset_all(self, only_blackholed: bool = False) -> None:
        """Reset connections and wait (bounded) until their sockets are closed."""
        for connection in list(self._connections):
            if connection.blackholed or not only_blackholed:
                connection.reset()
        await self._settle()

    async def _settle(self) -> None:
        """Wait (bounded) until every reset connection has finished closing."""
        closing = {c.task for c in self._connections if c.closed}
        if closing:
            await asyncio.wait(closing, timeout=_CLOSE_TIMEOUT_S)

    async def _set_refuse(self, on: bool) -> None:
        self._refusing = on
        if on:
            self._stop_listening()
            await self._reset_all()
        elif self._server is None:
            await self._listen()

    async def _set_blackhole(self, on: bool) -> None:
        self._blackhole = on
        if on:
            for connection in self._connections:
                connection.blackholed = True
        else:
            await self._reset_all(only_blackholed=True)

    async def _heal(self) -> None:
        self._latency_s = 0.0
        self._throttle = None
        self._http_status = None
        await self._set_blackhole(False)
        await self._set_refuse(False)

    async def _shutdown(self) -> None:
        self._refusing = True
        self._stop_listening()
        for connection in list(self._connections):
            connection.reset()
        if self._serving:
            await asyncio.wait(set(self._serving), timeout=_CLOSE_TIMEOUT_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle one accepted connection from start to end (never raises)."""
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(writer, task)
        self._serving.add(task)
        self._connections.add(connection)
        self._connections_total += 1
        self._connections_open += 1
        try:
            await self._forward(connection, reader)
        except asyncio.CancelledError:
            connection.reset()
            raise
        except Exception:
            log.exception("fault proxy: connection failed")
            connection.reset()
        finally:
            connection.stop_pumps()
            try:
                await connection.close()
            finally:
                self._connections.discard(connection)
                self._connections_open -= 1
                self._serving.discard(task)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the target; the socket is closed on any failure (no leak)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._target_host, self._target_port, type=socket.SOCK_STREAM
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, address), _CONNECT_TIMEOUT_S)
            return await asyncio.open_connection(sock=sock, limit=_CHUNK)
        except BaseException:
            sock.close()
            raise

    async def _forward(self, connection: _Connection, client: asyncio.StreamReader) -> None:
        if self._refusing:  # accepted just before the listener closed
            connection.reset()
            return
        upstream: asyncio.StreamReader | None = None
        if self._blackhole:
            connection.blackholed = True
        else:
            try:
                upstream, connection.upstream = await self._connect_upstream()
            except (OSError, TimeoutError):
                connection.reset()  # the target refused: so does the proxy
                return
            if connection.closed:  # reset while connecting
                _send_rst(connection.upstream.transport)
                return
        up: asyncio.Queue[_Chunk | None] = asyncio.Queue(_QUEUE_CHUNKS)
        pumps = [
            self._read(connection, client, up, from_client=True),
            self._write(connection, up, connection.upstream, to_target=True),
        ]
        if upstream is not None:
            down: asyncio.Queue[_Chunk | None] = asyncio.Queue(_QUEUE_CHUNKS)
            pumps.append(self._read(connection, upstream, down, from_client=False))
            pumps.append(self._write(connection, down, connection.client, to_target=False))
        connection.tasks.update(asyncio.create_task(pump) for pump in pumps)
        await asyncio.wait(connection.tasks)
        if connection.blackholed:
            await connection.released.wait()  # ends only when reset

    async def _read(
        self,
        connection: _Connection,
        source: asyncio.StreamReader,
        queue: asyncio.Queue[_Chunk | None],
        *,
        from_client: bool,
    ) -> None:
        """Read `source` into `queue`, stamping each chunk with its delivery time."""
        try:
            while data := await source.read(_CHUNK):
                if connection.blackholed or connection.answering:
                    continue  # dropped
                if from_client and self._http_status is not None:
                    await self._answer_http(connection, source, data, self._http_status)
                    return
                await queue.put((time.monotonic() + self._latency_s, data))
        except OSError:
            if not connection.blackholed:
                connection.reset()  # pass a reset on
            return
        await queue.put(None)  # EOF

    async def _write(
        self,
        connection: _Connection,
        queue: asyncio.Queue[_Chunk | None],
        target: asyncio.StreamWriter | None,
        *,
        to_target: bool,
    ) -> None:
        """Deliver chunks from `queue` to `target` in order, with latency and throttle."""
        next_free = time.monotonic()  # throttle: when the link is free for the next slice

        def dropping() -> bool:
            return target is None or connection.blackholed or connection.answering

        try:
            while (item := await queue.get()) is not None:
                deliver_at, data = item
                if dropping():
                    continue
                await _sleep_until(deliver_at)
                offset = 0
                while offset < len(data) and not dropping():
                    rate = self._throttle
                    if rate is None:
                        piece = data[offset:]
                    else:
                        piece = data[offset : offset + max(1, rate // _THROTTLE_SLICES_PER_S)]
                        next_free = max(next_free, time.monotonic()) + len(piece) / rate
                        await _sleep_until(next_free)
                    if target is None or dropping():
                        break
                    target.write(piece)
                    await target.drain()
                    offset += len(piece)
                    if to_target:
                        self._bytes_up += len(piece)
                    else:
                        self._bytes_down += len(piece)
            if target is not None and not dropping() and target.can_write_eof():
                target.write_eof()  # pass a half-close on
        except OSError:
            if not connection.blackholed:
                connection.reset()

    async def _answer_http(
        self,
        connection: _Connection,
        client: asyncio.StreamReader,
        first: bytes,
        status: int,
    ) -> None:
        """Answer the request that starts with `first` with `status`, then close."""
        connection.answering = True
        connection.stop_pumps()
        if connection.upstream is not None:
            connection.upstream.close()
        request = bytearray(first)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_HTTP_READ_TIMEOUT_S):
                while not _http_request_complete(bytes(request)):
                    more = await client.read(_CHUNK)
                    if not more:
                        break
                    request += more
        writer = connection.client
        with contextlib.suppress(OSError, TimeoutError):
            writer.write(_http_error_response(status))
            async with asyncio.timeout(_HTTP_LINGER_S):
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                # Read until the client closes, so no unread byte turns our close into an
                # RST that could overtake the response.
                while await client.read(_CHUNK):
                    pass
