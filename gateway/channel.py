"""A framed channel between the gateway process and one of its children, over one end of
a socket pair, and the messages every child speaks.

Frames are length-prefixed; what a frame holds is its `Codec`'s business, one for each
side of each kind of child: the API process's channel (`gateway.api.channel`) carries
pickles to the API process and checked JSON back, a worker's (`gateway.worker.channel`)
pickles both ways. A frame over the receiving side's limit, or one its codec refuses,
is a `ChannelError`.

`send` never blocks the loop: it buffers, and droppable messages (log lines, forwarded
results) are dropped while the other side is not reading. `call` asks the other side a
question and waits, bounded, for its `Reply`; `answer` answers one in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Answer",
    "Call",
    "Channel",
    "ChannelError",
    "Codec",
    "Reply",
    "Started",
    "Stop",
]

log = logging.getLogger("gateway.channel")

_HEADER = struct.Struct(">I")
# Unsent bytes past which droppable messages are dropped rather than buffered.
_MAX_BUFFERED_BYTES = 8 * 1024 * 1024
_CALL_TIMEOUT_S = 10.0

# What answers a `Call`: an async function of no arguments.
Answer = Callable[[], Awaitable[Any]]


class ChannelError(Exception):
    """A frame that is not a message this side accepts."""


@dataclass(frozen=True, slots=True)
class Started:
    """The child is up (child -> gateway)."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop as on SIGTERM: finish what is under way, bounded (gateway -> child)."""


@dataclass(frozen=True, slots=True)
class Call:
    """A question (`op`); answered by a `Reply` with the same `call_id`."""

    call_id: int
    op: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a `Call`."""

    call_id: int
    value: Any = field(repr=False)


@dataclass(frozen=True, slots=True)
class Codec:
    """How one side writes its messages and reads the other's."""

    encode: Callable[[Any], bytes]
    # Raises ChannelError for a frame that is not a message this side accepts.
    decode: Callable[[bytes], Any]
    # Largest frame this side reads; a larger one is a ChannelError.
    max_frame: int


class Channel:
    """One end of the socket pair, speaking through `codec`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        codec: Codec,
        name: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._codec = codec
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self.closed = False
        self.dropped = 0

    @classmethod
    async def open(cls, sock: socket.socket, codec: Codec, name: str) -> Channel:
        """Wrap a connected socket (one end of a socket pair); `name` is for log lines."""
        reader, writer = await asyncio.open_connection(sock=sock, limit=codec.max_frame)
        return cls(reader, writer, codec, name)

    def send(self, message: object, *, droppable: bool = False) -> None:
        """Queue one message (from any thread); dropped once the channel is closed, and
        when `droppable` while the other side has fallen behind."""
        if threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(lambda: self.send(message, droppable=droppable))
            return
        if self.closed or self._writer.is_closing():
            return
        if droppable and self._writer.transport.get_write_buffer_size() > _MAX_BUFFERED_BYTES:
            self.dropped += 1
            return
        data = self._codec.encode(message)
        self._writer.write(_HEADER.pack(len(data)) + data)

    async def receive(self) -> Any:
        """The next message, or None once the other end has closed; a frame that is not
        a message this side accepts raises ChannelError (and closes the channel)."""
        try:
            size = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))[0]
            data = await self._reader.readexactly(size) if size <= self._codec.max_frame else None
        except (asyncio.IncompleteReadError, ConnectionError):
            self._close_calls()
            return None
        if data is None:
            self._close_calls()
            raise ChannelError(f"a frame of {size} bytes")
        try:
            message = self._codec.decode(data)
        except ChannelError:
            self._close_calls()
            raise
        if isinstance(message, Reply):
            self._resolve(message)
        return message

    async def call(self, op: str, timeout_s: float = _CALL_TIMEOUT_S) -> Any:
        """Ask the other side; raises ConnectionError if it is gone, TimeoutError if it
        does not answer within `timeout_s`."""
        if self.closed:
            raise ConnectionError("channel closed")
        self._next_id += 1
        call_id = self._next_id
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = future
        try:
            self.send(Call(call_id, op))
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._calls.pop(call_id, None)

    def answer(self, call: Call, answers: Mapping[str, Answer]) -> None:
        """Answer `call` in the background: None for an op without an answer, or when
        the answer failed (logged by type; the asking side then reports it)."""
        answer = answers.get(call.op)

        async def reply() -> None:
            value: Any = None
            if answer is not None:
                try:
                    value = await answer()
                except Exception as exc:  # noqa: BLE001  # the asker reports a missing answer
                    log.error(
                        f"{self._name}_call_failed",
                        extra={"op": call.op, "error": type(exc).__name__},
                    )
            self.send(Reply(call.call_id, value))

        task = asyncio.create_task(reply(), name=f"{self._name}-call-{call.op}")
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    def _resolve(self, reply: Reply) -> None:
        future = self._calls.get(reply.call_id)
        if future is not None and not future.done():
            future.set_result(reply.value)

    def _close_calls(self) -> None:
        self.closed = True
        for future in self._calls.values():
            if not future.done():
                future.set_exception(ConnectionError("channel closed"))

    async def close(self) -> None:
        """Close this end; calls under way fail with ConnectionError, answers under way
        are cancelled."""
        self._close_calls()
        for task in list(self._answering):
            task.cancel()
        if self._answering:
            await asyncio.wait(set(self._answering))
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
