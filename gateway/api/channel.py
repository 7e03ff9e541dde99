"""The channel between the gateway process and its API process, and every message on it.

One socket pair, length-prefixed frames. The two directions are not alike, because the
API process faces the network and the gateway process holds the Vault credentials:

- gateway -> API process: pickles (`Init` carries the settings and the catalog, which
  JSON cannot), from the trusted side only. Frames up to `MAX_FRAME_TO_API`.
- API process -> gateway: JSON only, at most `MAX_FRAME_FROM_API` bytes a frame, and
  every message is checked field by field as it is decoded (`decode_from_api`). A log
  line keeps only a known logger name, an event name, and a bounded set of plain
  fields, so the API process can neither forge audit lines nor flood the gateway's
  log. Anything else is a `ChannelError`, and the gateway replaces the API process.

`send` never blocks the loop: it buffers, and droppable messages (log lines one way,
forwarded results the other) are dropped while the other side is not reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.catalog import Catalog
from gateway.records import JobStatus
from gateway.settings import Settings

__all__ = [
    "ACTIONS",
    "ADMIN_ACTIONS",
    "CALLS",
    "MAX_FRAME_FROM_API",
    "MAX_FRAME_TO_API",
    "AdminDone",
    "Call",
    "CatalogChanged",
    "Channel",
    "ChannelError",
    "Denied",
    "FromApi",
    "Init",
    "LogLine",
    "Reply",
    "ResultReady",
    "Started",
    "Stop",
    "ToApi",
    "decode_from_api",
    "encode_from_api",
]

log = logging.getLogger("gateway.api.channel")

_HEADER = struct.Struct(">I")
MAX_FRAME_FROM_API = 1024 * 1024
MAX_FRAME_TO_API = 256 * 1024 * 1024
# Unsent bytes past which droppable messages are dropped rather than buffered.
_MAX_BUFFERED_BYTES = 8 * 1024 * 1024
_CALL_TIMEOUT_S = 10.0

# What the API process may ask the gateway, the actions a denial can name, and the
# admin actions it reports for the audit log.
CALLS = ("ready", "metrics", "tenants")
ACTIONS = ("get", "cancel")
ADMIN_ACTIONS = ("pause", "resume", "cancel_all", "redrive", "redrive_dry_run")

# Loggers the API process's lines may come out under; anything else becomes the first.
_API_LOGGERS = frozenset(
    {
        "gateway.api",
        "gateway.api.process",
        "gateway.api.channel",
        "gateway.http",
        "gateway.ops",
        "gateway.status",
        "gateway.outbox",
        "gateway.tasks",
        "uvicorn.error",
    }
)
_EVENT = re.compile(r"[a-z][a-z0-9_]{0,63}")
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Fields a log line from the API process may not set (the record's own, and `audit`).
_RESERVED = frozenset(
    set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "audit", "replica"}
)
_MAX_FIELDS = 24
_MAX_TEXT = 1024


class ChannelError(Exception):
    """A frame that is not a message this side accepts."""


# -- gateway -> API process ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Init:
    """What the API process starts from (settings without Vault credentials)."""

    settings: Settings
    catalog: Catalog
    job_types: frozenset[str]


@dataclass(frozen=True, slots=True)
class CatalogChanged:
    """A reloaded catalog (keys, allowed types, quotas)."""

    catalog: Catalog


@dataclass(frozen=True, slots=True)
class ResultReady:
    """A job this replica finished and the broker has: GET answers it at once."""

    value: bytes = field(repr=False)
    status: JobStatus


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a `Call`."""

    call_id: int
    value: Any = field(repr=False)


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop serving (requests under way finish, bounded)."""


ToApi = Init | CatalogChanged | ResultReady | Reply | Stop


# -- API process -> gateway (JSON, checked on arrival) --------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """The API process serves."""


@dataclass(frozen=True, slots=True)
class LogLine:
    """One log record of the API process, reduced to what the gateway will write."""

    logger: str
    level: int
    event: str
    fields: dict[str, str | int | float | bool | None]


@dataclass(frozen=True, slots=True)
class Denied:
    """A tenant asked for (`action`) a job id that belongs to another tenant."""

    tenant: str
    job_id: str
    action: str
    source: str


@dataclass(frozen=True, slots=True)
class AdminDone:
    """An operator's action through the admin API, for the gateway's audit log."""

    action: str
    by: str
    tenant: str
    count: int
    detail: str


@dataclass(frozen=True, slots=True)
class Call:
    """A question for the gateway (`op` in CALLS); answered by a `Reply`."""

    call_id: int
    op: str


FromApi = Started | LogLine | Denied | AdminDone | Call


def encode_from_api(message: FromApi) -> bytes:
    """A message of the API process as the JSON the gateway reads."""
    wire: list[Any]
    if isinstance(message, Started):
        wire = ["started"]
    elif isinstance(message, LogLine):
        wire = ["log", message.logger, message.level, message.event, message.fields]
    elif isinstance(message, Denied):
        wire = ["denied", message.tenant, message.job_id, message.action, message.source]
    elif isinstance(message, AdminDone):
        wire = ["admin", message.action, message.by, message.tenant, message.count, message.detail]
    else:
        wire = ["call", message.call_id, message.op]
    return json.dumps(wire, separators=(",", ":"), default=str).encode()


def _text(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise ChannelError("expected a string")
    return value[:limit]


def _plain_fields(raw: Any) -> dict[str, str | int | float | bool | None]:
    if not isinstance(raw, dict):
        raise ChannelError("log fields must be an object")
    fields: dict[str, str | int | float | bool | None] = {}
    for key, value in list(raw.items())[:_MAX_FIELDS]:
        if not isinstance(key, str) or not _FIELD.fullmatch(key) or key in _RESERVED:
            continue
        if isinstance(value, str):
            fields[key] = value[:_MAX_TEXT]
        elif value is None or isinstance(value, bool | int | float):
            fields[key] = value
    return fields


def decode_from_api(data: bytes) -> FromApi:
    """Decode and check one frame from the API process, or raise ChannelError."""
    try:
        wire = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
        raise ChannelError(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(wire, list) or not wire or not isinstance(wire[0], str):
        raise ChannelError("not a message")
    tag, args = wire[0], wire[1:]
    if tag == "started" and not args:
        return Started()
    if tag == "log" and len(args) == 4:
        name, level, event, fields = args
        logger = name if isinstance(name, str) and name in _API_LOGGERS else "gateway.api"
        if not isinstance(level, int) or isinstance(level, bool):
            raise ChannelError("log level must be an integer")
        event = event if isinstance(event, str) and _EVENT.fullmatch(event) else "api_log"
        level = min(max(level, logging.DEBUG), logging.CRITICAL)
        return LogLine(logger, level, event, _plain_fields(fields))
    if tag == "denied" and len(args) == 4:
        tenant, job_id, action, source = (_text(arg, 256) for arg in args)
        if action not in ACTIONS:
            raise ChannelError("unknown action")
        return Denied(tenant, job_id, action, source)
    if tag == "admin" and len(args) == 5:
        action, by, tenant, count, detail = args
        if action not in ADMIN_ACTIONS or not isinstance(count, int) or isinstance(count, bool):
            raise ChannelError("bad admin action")
        return AdminDone(action, _text(by, 64), _text(tenant, 64), count, _text(detail, 512))
    if tag == "call" and len(args) == 2:
        call_id, op = args
        if not isinstance(call_id, int) or isinstance(call_id, bool) or op not in CALLS:
            raise ChannelError("bad call")
        return Call(call_id, op)
    raise ChannelError(f"unknown message {tag[:32]!r}")


class Channel:
    """One end of the socket pair: `side` says which, and so what it sends and accepts."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        side: Literal["gateway", "api"],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._side = side
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self.closed = False
        self.dropped = 0

    @classmethod
    async def open(cls, sock: socket.socket, side: Literal["gateway", "api"]) -> Channel:
        """Wrap a connected socket (one end of a socket pair)."""
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_FRAME_FROM_API)
        return cls(reader, writer, side)

    def send(self, message: ToApi | FromApi, *, droppable: bool = False) -> None:
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
        if self._side == "gateway":
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            assert isinstance(message, Started | LogLine | Denied | AdminDone | Call)
            data = encode_from_api(message)
        self._writer.write(_HEADER.pack(len(data)) + data)

    async def receive(self) -> Any:
        """The next message, or None once the other end has closed. On the gateway's
        side a frame that is not a valid message raises ChannelError."""
        limit = MAX_FRAME_FROM_API if self._side == "gateway" else MAX_FRAME_TO_API
        try:
            size = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))[0]
            data = await self._reader.readexactly(size) if size <= limit else None
        except (asyncio.IncompleteReadError, ConnectionError):
            self._close_calls()
            return None
        if data is None:
            self._close_calls()
            raise ChannelError(f"a frame of {size} bytes")
        if self._side == "gateway":
            try:
                return decode_from_api(data)
            except ChannelError:
                self._close_calls()
                raise
        message = pickle.loads(data)  # noqa: S301  # only ever from the gateway process
        if isinstance(message, Reply):
            self._resolve(message)
        return message

    async def call(self, op: str) -> Any:
        """Ask the gateway (API side); raises ConnectionError if it is gone, TimeoutError
        if it does not answer in time."""
        if self.closed:
            raise ConnectionError("channel closed")
        self._next_id += 1
        call_id = self._next_id
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = future
        try:
            self.send(Call(call_id, op))
            return await asyncio.wait_for(future, _CALL_TIMEOUT_S)
        finally:
            self._calls.pop(call_id, None)

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
        """Close this end; calls under way fail with ConnectionError."""
        self._close_calls()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
