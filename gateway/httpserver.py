"""uvicorn in a thread of the gateway process, with the gateway owning signals and logging.

The API runs on its own event loop in its own thread: the job loop can have hundreds
of flows' callbacks ready at once, and an answer that waited for each of its steps
behind them would take as long as the job work in flight. Handlers reach the gateway's
state through `ControlApi` (a locked status view, coroutines run on the main loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from gateway.errors import ConfigError
from gateway.settings import HttpSettings

__all__ = ["HttpServer"]

log = logging.getLogger("gateway.http")

_STARTUP_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would replace the SIGTERM/SIGINT handlers and re-raise the signal when
        # it stops; the gateway handles both itself (service.run_gateway) and stops the
        # server in its own shutdown order. (Off the main thread uvicorn skips this
        # anyway; the override keeps it so wherever the server runs.)
        yield


def _bind(host: str, port: int) -> socket.socket:
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
        raise ConfigError(f"HTTP API cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _serve(server: _Server, sock: socket.socket) -> None:
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except BaseException as exc:  # uvicorn exits with SystemExit on startup errors
        log.exception("http_server_failed", extra={"error": type(exc).__name__})


class HttpServer:
    """Serves an ASGI app on settings.host/port (port 0: any free port, see `port`)
    from a thread with its own event loop."""

    def __init__(self, app: ASGIApp, settings: HttpSettings) -> None:
        self.app = app
        self._settings = settings
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Bind (a clear error when the port is taken) and serve until `stop()`."""
        settings = self._settings
        sock = _bind(settings.host, settings.port)
        config = uvicorn.Config(
            self.app,
            # httptools (C parser): h11's pure-Python parsing was most of the ~0.45 ms
            # of CPU per request, taken from the job loop's share of the interpreter.
            http="httptools",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            # No Date or Server header: answers that must be byte-identical stay so.
            date_header=False,
            server_header=False,
            # The audit log records the peer address; a client must not be able to set it.
            proxy_headers=False,
            limit_concurrency=settings.max_connections,
            timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        )
        server = _Server(config)
        self._server = server
        # A daemon thread: a server that ignores the bounded stop cannot hold the exit.
        self._thread = threading.Thread(
            target=_serve, args=(server, sock), name="gateway-http", daemon=True
        )
        self._thread.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STARTUP_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or loop.time() > deadline:
                await self.stop()
                sock.close()
                raise ConfigError("HTTP API did not start")
            await asyncio.sleep(0.01)
        self.port = int(sock.getsockname()[1])
        log.info("http_started", extra={"host": settings.host, "port": self.port})

    async def stop(self) -> None:
        """Stop accepting, let requests under way finish (bounded), close; idempotent."""
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is None or thread is None:
            return
        server.should_exit = True  # read by the server's own loop every 0.1 s
        await asyncio.to_thread(thread.join, self._settings.shutdown_timeout_s + 1.0)
        if thread.is_alive():
            server.force_exit = True
            await asyncio.to_thread(thread.join, 2.0)
        log.info("http_stopped", extra={"clean": not thread.is_alive()})
