"""Structured logging: JSON lines (or plain text on a terminal) with job context fields."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from gateway.envelope import Job

__all__ = ["ClientLogLimit", "configure_logging", "flow_event_middleware", "job_log"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_REPLICA = {"value": ""}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, replica, plus the record's extras."""

    def __init__(self, replica: str | None = None) -> None:
        super().__init__()
        self._replica = replica

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        replica = self._replica if self._replica is not None else _REPLICA["value"]
        if replica:
            body["replica"] = replica
        body.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        )
        if record.exc_info and record.exc_info[0] is not None:
            # Type only: exception text can carry payload data or secrets.
            body["exc_type"] = record.exc_info[0].__name__
        return json.dumps(body, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """Readable single lines for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _STANDARD and not k.startswith("_")
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        return f"{line} {extras}" if extras else line


class ClientLogLimit(logging.Filter):
    """Lines of the Kafka client library (`aiokafka`, `kafka`), limited: at most `burst`
    then `per_s` a second of each message, and at most `total_burst` then `total_per_s`
    a second of all of them together. During a broker outage the library writes an
    error for every connection attempt and every request, hundreds a second, many with
    the address or the error in the message itself. The next line let through after
    dropped ones says how many were dropped since the previous one (`suppressed`); the
    gateway's own `broker_unreachable`/`broker_recovered` lines say what is going on."""

    def __init__(
        self,
        per_s: float = 1.0,
        burst: int = 3,
        *,
        total_per_s: float = 2.0,
        total_burst: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._per_s = per_s
        self._burst = float(burst)
        self._total_per_s = total_per_s
        self._total_burst = float(total_burst)
        self._clock = clock
        # message template -> (tokens, last refill)
        self._state: dict[str, tuple[float, float]] = {}
        self._total: tuple[float, float] | None = None
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("aiokafka", "kafka")):
            return True
        key = f"{record.name}:{record.msg}"
        now = self._clock()
        tokens, stamp = self._state.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._per_s)
        total, total_stamp = self._total or (self._total_burst, now)
        total = min(self._total_burst, total + (now - total_stamp) * self._total_per_s)
        if tokens < 1.0 or total < 1.0:
            self._state[key] = (tokens, now)
            self._total = (total, now)
            self._dropped += 1
            return False
        if self._dropped:
            record.suppressed = self._dropped
            self._dropped = 0
        if len(self._state) >= 1000:  # messages with their details in them: bound it
            self._state.clear()
        self._state[key] = (tokens - 1.0, now)
        self._total = (total - 1.0, now)
        return True


def configure_logging(
    fmt: str = "auto",
    level: str = "INFO",
    replica: str = "",
    stream: TextIO | None = None,
    *,
    handler: logging.Handler | None = None,
) -> None:
    """Route every gateway log line to `stream` (stderr) in the chosen format, or to
    `handler` as it is (the API process forwards records to the gateway's logging).
    Either way the Kafka client's lines are limited here, where their logger is still
    known (the gateway writes the API process's lines under its own names)."""
    _REPLICA["value"] = replica
    if handler is None:
        stream = stream if stream is not None else sys.stderr
        use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter() if use_json else PlainFormatter())
        handler.addFilter(ClientLogLimit())
    else:
        # The API process's clients see the same outage as the gateway's: a line
        # every other second is enough to show it is theirs too.
        handler.addFilter(ClientLogLimit(0.5, 1, total_per_s=0.5, total_burst=1))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # PenguiFlow logs every node event itself, with exception reprs that may carry
    # payload data; we capture its FlowEvents through our middleware instead.
    pf = logging.getLogger("penguiflow")
    pf.setLevel(logging.CRITICAL + 1)
    pf.propagate = False
    for noisy in ("aiokafka", "kafka", "urllib3", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def job_log(logger: logging.Logger, level: int, event: str, job: Job, **fields: Any) -> None:
    """Log a job event with its identifying fields (never its payload)."""
    if logger.isEnabledFor(level):
        extra = {
            "job_id": job.id,
            "tenant": job.tenant,
            "type": job.type,
            "attempt": job.attempt,
            "trace_id": f"job-{job.id}",
        }
        extra.update({k: v for k, v in fields.items() if v is not None})
        logger.log(level, event, extra=extra)


_flow_log = logging.getLogger("gateway.flow")
_FLOW_EVENTS = {"node_error", "node_timeout", "node_failed", "trace_cancel_start", "deadline_skip"}


def flow_event_middleware(
    job: Job, node_latency: Callable[[str, float], None] | None = None
) -> Callable[[Any], Awaitable[None]]:
    """A PenguiFlow middleware for one job: logs its notable FlowEvents with its tenant
    (FlowEvent carries none; the flow is the job's, so we know it) and reports each
    node's latency to `node_latency(node_name, seconds)`."""

    async def middleware(event: Any) -> None:
        name = event.event_type
        if node_latency is not None and name == "node_success" and event.latency_ms is not None:
            node_latency(event.node_name or "?", event.latency_ms / 1000)
        if name in _FLOW_EVENTS and _flow_log.isEnabledFor(logging.INFO):
            level = logging.WARNING if name in ("node_error", "node_failed") else logging.INFO
            job_log(
                _flow_log,
                level,
                name,
                job,
                node=event.node_name,
                latency_ms=event.latency_ms,
            )

    return middleware
