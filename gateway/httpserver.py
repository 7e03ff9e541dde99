"""uvicorn on the running event loop, with the caller owning signals and logging.

The gateway binds the listening socket itself (`bind`: a taken port is a clear error at
start, and port 0 is known at once) and hands it to the process that serves the API
(`gateway.apiprocess`), which runs `HttpServer` on its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from gateway.errors import ConfigError
from gateway.settings import HttpSettings

__all__ = ["HttpServer", "bind"]

log = logging.getLogger("gateway.http")

_STARTUP_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would replace the SIGTERM/SIGINT handlers and re-raise the signal when
        # it stops; the process serving the API handles both itself and stops the
        # server in its own shutdown order.
        yield


def bind(host: str, port: int) -> socket.socket:
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
        raise ConfigError(f"HTTP API cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


async def _serve(server: _Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except (Exception, SystemExit) as exc:  # uvicorn exits with SystemExit on startup errors
        log.exception("http_server_failed", extra={"error": type(exc).__name__})


class HttpServer:
    """Serves an ASGI app on a bound socket from the running loop until `stop()`."""

    def __init__(self, app: ASGIApp, settings: HttpSettings) -> None:
        self.app = app
        self._settings = settings
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock` (see `bind`); returns once the server accepts connections."""
        settings = self._settings
        config = uvicorn.Config(
            self.app,
            # httptools (C parser): h11's pure-Python parsing was most of the ~0.45 ms
            # of CPU per request.
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
        self._task = asyncio.create_task(_serve(server, sock), name="gateway-http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STARTUP_TIMEOUT_S
        while not server.started:
            if self._task.done() or loop.time() > deadline:
                await self.stop()
                raise ConfigError("HTTP API did not start")
            await asyncio.sleep(0.01)
        self.port = int(sock.getsockname()[1])
        log.info("http_started", extra={"host": settings.host, "port": self.port})

    async def stop(self) -> None:
        """Stop accepting, let requests under way finish (bounded), close; idempotent."""
        server, self._server = self._server, None
        task, self._task = self._task, None
        if server is None or task is None:
            return
        server.should_exit = True  # read by the server's own loop every 0.1 s
        done, _ = await asyncio.wait({task}, timeout=self._settings.shutdown_timeout_s + 1.0)
        if not done:
            server.force_exit = True
            done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:
            task.cancel()
        log.info("http_stopped", extra={"clean": bool(done)})
