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

The framing, calls and replies are `gateway.channel`'s; `open_channel` opens either end.
`send` never blocks the loop: droppable messages (log lines one way, forwarded results
the other) are dropped while the other side is not reading.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.catalog import Catalog
from gateway.channel import Call, Channel, ChannelError, Codec, Reply, Started, Stop
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
    "codec",
    "decode_from_api",
    "encode_from_api",
    "open_channel",
]

MAX_FRAME_FROM_API = 1024 * 1024
MAX_FRAME_TO_API = 256 * 1024 * 1024

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


# Also `Reply` (to the API process's `Call`s) and `Stop` (stop serving; requests under
# way finish, bounded), from gateway.channel.
ToApi = Init | CatalogChanged | ResultReady | Reply | Stop


# -- API process -> gateway (JSON, checked on arrival) --------------------------------


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


# Also `Started` (the API process serves) and `Call` (a question for the gateway, `op`
# in CALLS), from gateway.channel.
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


def _encode_to_api(message: ToApi) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _decode_to_api(data: bytes) -> ToApi:
    message: ToApi = pickle.loads(data)  # noqa: S301  # only ever from the gateway process
    return message


_CODECS = {
    "gateway": Codec(_encode_to_api, decode_from_api, MAX_FRAME_FROM_API),
    "api": Codec(encode_from_api, _decode_to_api, MAX_FRAME_TO_API),
}


def codec(side: Literal["gateway", "api"]) -> Codec:
    """How the `side` end of the API process's channel writes and reads."""
    return _CODECS[side]


async def open_channel(sock: socket.socket, side: Literal["gateway", "api"]) -> Channel:
    """The `side` end of the API process's channel, on one end of a socket pair."""
    return await Channel.open(sock, codec(side), "api")
