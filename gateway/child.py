"""A child process of the gateway, kept running while the gateway runs: the API process
(`gateway.api`) and the extra workers of `gateway run --workers N` (`gateway.worker`).

A child is `python -m <module> [FD ...] CHANNEL_FD`: sockets handed over by file
descriptor, then one end of a socket pair as its channel (`gateway.channel`). Its
environment has no Vault credentials (`child_environ`): a child that needs them (a
worker) gets them over the channel, after it has made itself undumpable. It is up once
it says `Started`, within a bound. If it exits while the gateway runs, or its channel
breaks or carries a bad frame, it is (killed and) started again after a backoff that
doubles from 0.5 s to 30 s and is back at 0.5 s for a child that ran a minute:
`<name>_exited`, then `<name>_restarted`. `stop()` asks it to stop over the channel,
waits a bound, then kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gateway.channel import Answer, Call, Channel, ChannelError, Codec, Started, Stop
from gateway.errors import ConfigError
from gateway.tasks import Supervisor, first_of

__all__ = ["Child", "child_environ"]

_RESTART_BACKOFF_S = (0.5, 30.0)  # first and longest wait before a restart
_HEALTHY_AFTER_S = 60.0  # a child that ran this long restarts without waiting
_EXIT_AFTER_CLOSE_S = 1.0  # a child whose channel closed has this long to exit on its own
_SECRET_ENV_PREFIXES = ("GATEWAY_VAULT__", "VAULT_", "BAO_")


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The gateway's environment without anything that could carry Vault credentials
    (`GATEWAY_VAULT__*`, and the `VAULT_*`/`BAO_*` variables the CLIs read)."""
    return {
        key: value
        for key, value in environ.items()
        if not key.upper().startswith(_SECRET_ENV_PREFIXES)
    }


class Child:
    """One child process: started, watched, restarted with backoff, stopped in a bound.

    `what` names it in errors (`HTTP API process`), `name` prefixes its log events
    (`api_process`, `worker`) and `fields` are added to each; its channel speaks
    `codec`. The child's first message is `greeting()` (at every start); `Call`s it
    makes are answered from `answers`, and every other message but `Started` goes to
    `on_message`.
    """

    def __init__(
        self,
        what: str,
        name: str,
        module: str,
        *,
        codec: Codec,
        channel_name: str,
        greeting: Callable[[], object],
        on_message: Callable[[object], None],
        tasks: Supervisor,
        logger: logging.Logger,
        start_timeout_s: float,
        stop_timeout_s: float,
        fds: Sequence[int] = (),
        answers: Mapping[str, Answer] | None = None,
        fields: Mapping[str, object] | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self._what = what
        self._name = name
        self._module = module
        self._codec = codec
        self._channel_name = channel_name
        self._greeting = greeting
        self._on_message = on_message
        self._tasks = tasks
        self._log = logger
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._fds = tuple(fds)  # -1: none (the child's argument says so)
        self._answers = answers or {}
        self._fields = dict(fields or {})
        self._on_restart = on_restart
        self._proc: asyncio.subprocess.Process | None = None
        self._started = asyncio.Event()
        self._readers: set[asyncio.Task[Any]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._stop_sent = False
        # The process running when a stop was first asked for (what `stop` reports on).
        self._asked: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.restarts = 0
        self.exit_code: int | None = None  # of its last exit

    @property
    def pid(self) -> int | None:
        """The child's PID while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def up(self) -> bool:
        """Running, and said it started."""
        return self.pid is not None and self._started.is_set()

    def problem(self) -> str | None:
        """Why the child is not up (None when it is)."""
        if self.up:
            return None
        if self.pid is not None:
            return "starting"
        if self.exit_code is not None:
            return f"exited with code {self.exit_code}, restarting"
        return "not running"

    async def start(self) -> None:
        """Start the child and wait until it says it started (ConfigError if it does not
        within the bound), then keep it running."""
        await self._launch()
        self._watch = self._tasks.spawn(self._supervise(), f"gateway:{self._name}-supervisor")

    async def wait(self) -> None:
        """Until the child's process, if one runs, has exited."""
        proc = self._proc
        if proc is not None:
            await proc.wait()

    def start_soon(self) -> None:
        """Start the child in the background and keep it running; a first start that
        fails is retried like a restart."""
        self._watch = self._tasks.spawn(
            self._supervise(launch=True), f"gateway:{self._name}-supervisor"
        )

    def request_stop(self) -> None:
        """Ask the child to stop (it finishes what is under way); it is not restarted."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._asked = self._proc if self.pid is not None else None
            # The watch now ends when the child does: planned, not a failure.
            self._tasks.release(self._watch)
        channel = self.channel
        if channel is not None and self.pid is not None and not self._stop_sent:
            self._stop_sent = True
            channel.send(Stop())

    async def stop(self) -> int | None:
        """Ask the child to stop and wait, bounded, until it has (then kill it);
        idempotent. Its exit code, or None if it was not running when asked."""
        self.request_stop()
        watch, self._watch = self._watch, None
        await self._tasks.cancel(watch)
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), self._stop_timeout_s)
            except TimeoutError:
                self._log.warning(
                    f"{self._name}_killed", extra={"after_s": self._stop_timeout_s, **self._fields}
                )
                await self._kill()
        if proc is not None:
            self._log.info(
                f"{self._name}_stopped", extra={"exit_code": proc.returncode, **self._fields}
            )
        await self._close_channel()
        for task in list(self._readers):
            task.cancel()
        if self._readers:
            await asyncio.wait(set(self._readers))
        return self._asked.returncode if self._asked is not None else None

    def kill(self) -> None:
        """SIGKILL the child now (the gateway is exiting at once)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _launch(self) -> None:
        ours, theirs = socket.socketpair()
        fds = (*self._fds, theirs.fileno())
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self._module,
                *map(str, fds),
                pass_fds=[fd for fd in fds if fd >= 0],
                stdin=asyncio.subprocess.DEVNULL,
                env=child_environ(os.environ),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._proc = proc
        self._started = started = asyncio.Event()
        self._stop_sent = False
        try:
            channel = await Channel.open(ours, self._codec, self._channel_name)
        except BaseException:
            ours.close()
            raise
        self.channel = channel
        reader = asyncio.create_task(
            self._read(channel, proc, started), name=f"{self._channel_name}-channel"
        )
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        channel.send(self._greeting())
        await first_of(self._start_timeout_s, started.wait(), proc.wait())
        if not started.is_set():
            raise ConfigError(f"{self._what} did not start (see its log lines above)")

    async def _read(
        self, channel: Channel, proc: asyncio.subprocess.Process, started: asyncio.Event
    ) -> None:
        try:
            while (message := await channel.receive()) is not None:
                if isinstance(message, Started):
                    started.set()
                elif isinstance(message, Call):
                    channel.answer(message, self._answers)
                else:
                    self._on_message(message)
        except ChannelError as exc:
            self._log.error(
                f"{self._channel_name}_channel_bad_message",
                extra={"error": str(exc)[:200], **self._fields},
            )
        except Exception as exc:  # noqa: BLE001  # a bug here must not leave the child unheard
            self._log.exception(
                f"{self._channel_name}_channel_reader_failed",
                extra={"error": type(exc).__name__, **self._fields},
            )
        if proc.returncode is None and not self._stopping.is_set():
            # A child that died closes its channel a moment before it is seen to exit.
            await first_of(_EXIT_AFTER_CLOSE_S, proc.wait())
        if proc.returncode is None and not self._stopping.is_set():
            # The channel broke (or carried garbage) while the process lives on: replace it.
            self._log.error(
                f"{self._channel_name}_channel_closed", extra={"pid": proc.pid, **self._fields}
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _supervise(self, *, launch: bool = False) -> None:
        """Keep the child running: restart it whenever it exits (with backoff)."""
        wait_s = _RESTART_BACKOFF_S[0]
        started_at = time.monotonic()
        first = launch
        while not self._stopping.is_set():
            if launch:
                started_at = time.monotonic()
                try:
                    await self._launch()
                except Exception as exc:  # noqa: BLE001  # keep supervising; the next try may work
                    if self._stopping.is_set():
                        return  # asked to stop while starting: it did
                    event = "start_failed" if first else "restart_failed"
                    self._log.error(
                        f"{self._name}_{event}",
                        extra={"error": type(exc).__name__, **self._fields},
                    )
                    await self._kill()
                    self._proc = None
                else:
                    self._launched(first)
                first = False
            launch = True
            proc = self._proc
            if proc is not None:
                code = await proc.wait()
                if self._stopping.is_set():
                    return
                if time.monotonic() - started_at > _HEALTHY_AFTER_S:
                    wait_s = _RESTART_BACKOFF_S[0]
                self.exit_code = code
                self._log.error(
                    f"{self._name}_exited",
                    extra={"exit_code": code, "restart_in_s": wait_s, **self._fields},
                )
            await self._close_channel()
            await first_of(wait_s, self._stopping.wait())
            wait_s = min(wait_s * 2, _RESTART_BACKOFF_S[1])

    def _launched(self, first: bool) -> None:
        if first:
            self._log.info(f"{self._name}_started", extra={"pid": self.pid, **self._fields})
            return
        self.restarts += 1
        if self._on_restart is not None:
            self._on_restart()
        self._log.warning(
            f"{self._name}_restarted",
            extra={
                "pid": self.pid,
                "restarts": self.restarts,
                "exit_code": self.exit_code,
                **self._fields,
            },
        )

    async def _close_channel(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
