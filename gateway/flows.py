"""Job types and the per-job PenguiFlow runner.

A job type is a name bound to a factory that builds a fresh flow graph for one job.
The runner wraps every node so each message it receives or emits carries the job's
tenant (invariant 2), bounds the whole run by the job's deadline, and turns what the
flow's Rookery delivers into an Outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.errors import FlowError
from pydantic import BaseModel

from gateway.errors import ConfigError, GatewayError, JobError, JobTimeout, TenantViolation
from gateway.records import Status, dumps

__all__ = [
    "FlowFactory",
    "FlowGraph",
    "JobContext",
    "JobTypes",
    "Outcome",
    "SecretReader",
    "builtin_job_types",
    "load_job_types",
    "run_job",
]

FlowGraph = Sequence[tuple[Node, Sequence[Node]]]
Middleware = Callable[[Any], Awaitable[None]]
# PenguiFlow logs every node error with the exception's repr and traceback, which can
# carry payload data or secret values; the gateway reports FlowEvents through its own
# middleware instead (gateway.observability), so the library's logger stays silent.
logging.getLogger("penguiflow").setLevel(logging.CRITICAL + 1)

# How long flow.stop() may take once a job is over; a node that ignores
# cancellation must not hold its slot forever.
_STOP_TIMEOUT_S = 5.0


class SecretReader(Protocol):
    """Read access to the job's own tenant secrets (values never leave the node)."""

    async def get(self, path: str, key: str) -> str:
        """One secret value of the job's tenant."""
        ...


class _NoSecrets:
    async def get(self, path: str, key: str) -> str:
        raise JobError("no secret store is configured", retryable=False, code="secrets_disabled")

    def __repr__(self) -> str:
        return "<secrets: none>"


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a flow factory knows about the job it builds a flow for."""

    tenant: str
    job_id: str
    job_type: str
    attempt: int
    payload: Mapping[str, Any]
    deadline_at: float
    base_idempotency_key: str | None = None
    secrets: SecretReader = field(default_factory=_NoSecrets, repr=False)

    @property
    def trace_id(self) -> str:
        """The PenguiFlow trace of this job (one flow per job, so it is unique there)."""
        return f"job-{self.job_id}"

    def idempotency_key(self, step: str) -> str:
        """Stable across attempts and replicas: derive side-effect keys from this."""
        base = self.base_idempotency_key or self.job_id
        raw = "\x00".join((self.tenant, base, step)).encode()
        return hashlib.sha256(raw).hexdigest()


FlowFactory = Callable[[JobContext], FlowGraph]


class JobTypes:
    """Registry of job type names to flow factories."""

    def __init__(self) -> None:
        self._factories: dict[str, FlowFactory] = {}

    def register(self, name: str, factory: FlowFactory) -> None:
        """Bind a type name; a name can be bound once."""
        if name in self._factories:
            raise ConfigError(f"job type {name!r} is registered twice")
        self._factories[name] = factory

    def get(self, name: str) -> FlowFactory | None:
        """The factory for a type, or None."""
        return self._factories.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._factories))

    def __len__(self) -> int:
        return len(self._factories)


def _single_node(name: str, func: Callable[[Message, Any], Awaitable[Any]]) -> FlowGraph:
    return [(Node(func, name=name, policy=NodePolicy(validate="none")), [])]


def _echo(ctx: JobContext) -> FlowGraph:
    async def echo(message: Message, _: Any) -> Any:
        return message.payload

    return _single_node("echo", echo)


def _number(payload: Mapping[str, Any], name: str, default: float) -> float:
    value = payload.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise JobError(f"payload.{name} must be a number >= 0", retryable=False, code="bad_payload")
    return float(value)


def _sleep(ctx: JobContext) -> FlowGraph:
    async def sleep(message: Message, _: Any) -> Any:
        seconds = _number(message.payload, "seconds", 0.0)
        await asyncio.sleep(seconds)
        return {"slept_s": seconds}

    return _single_node("sleep", sleep)


def _fail(ctx: JobContext) -> FlowGraph:
    async def fail(message: Message, _: Any) -> Any:
        payload = message.payload
        succeed_on = payload.get("succeed_on_attempt")
        if (
            isinstance(succeed_on, int)
            and not isinstance(succeed_on, bool)
            and ctx.attempt >= succeed_on
        ):
            return {"attempt": ctx.attempt}
        retryable = payload.get("retryable", False) is True
        raise JobError("requested failure", retryable=retryable, code="requested_failure")

    return _single_node("fail", fail)


def _secret_digest(ctx: JobContext) -> FlowGraph:
    async def secret_digest(message: Message, _: Any) -> Any:
        path, key = message.payload.get("path"), message.payload.get("key")
        if not isinstance(path, str) or not isinstance(key, str):
            raise JobError("payload.path and payload.key must be strings", retryable=False)
        value = await ctx.secrets.get(path, key)
        # Only the digest leaves the node: it proves the right value arrived.
        return {"path": path, "key": key, "sha256": hashlib.sha256(value.encode()).hexdigest()}

    return _single_node("secret_digest", secret_digest)


def builtin_job_types() -> JobTypes:
    """The types every gateway ships: echo, sleep, fail (and secret_digest with Vault)."""
    types = JobTypes()
    types.register("echo", _echo)
    types.register("sleep", _sleep)
    types.register("fail", _fail)
    types.register("secret_digest", _secret_digest)
    return types


def load_job_types(modules: Sequence[str], types: JobTypes | None = None) -> JobTypes:
    """Built-ins plus every `register(types)` found in the GATEWAY_FLOWS modules."""
    types = types if types is not None else builtin_job_types()
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"GATEWAY_FLOWS: cannot import {module_name!r}: {exc}") from exc
        register = getattr(module, "register", None)
        if not callable(register):
            raise ConfigError(f"GATEWAY_FLOWS: {module_name!r} has no register(types) function")
        register(types)
    return types


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended."""

    status: Status
    result: Any = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool = False
    # False when the failure was not the job's (Vault outage): the retry keeps the attempt.
    counts_attempt: bool = True
    # A delay the failure itself suggests (e.g. how long Vault has been down), else backoff.
    retry_after_s: float | None = None

    @property
    def error(self) -> tuple[str, str] | None:
        """(code, message) or None."""
        if self.error_code is None:
            return None
        return (self.error_code, self.error_message or "")


def _check_tenant(message: Any, tenant: str, where: str) -> None:
    if isinstance(message, Message) and message.headers.tenant != tenant:
        raise TenantViolation(f"{where}: message for another tenant")
    if not isinstance(message, Message):
        raise TenantViolation(f"{where}: {type(message).__name__} is not a tenant-scoped Message")


class _TenantGuardContext:
    """A node's context whose emits are checked against the job's tenant."""

    def __init__(self, inner: Any, tenant: str) -> None:
        self._inner = inner
        self._tenant = tenant

    async def emit(self, msg: Any, to: Any = None) -> None:
        _check_tenant(msg, self._tenant, "emit")
        await self._inner.emit(msg, to)

    def emit_nowait(self, msg: Any, to: Any = None) -> None:
        _check_tenant(msg, self._tenant, "emit")
        self._inner.emit_nowait(msg, to)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _guard(func: Callable[..., Awaitable[Any]], tenant: str) -> Callable[..., Awaitable[Any]]:
    async def guarded(message: Any, ctx: Any) -> Any:
        _check_tenant(message, tenant, "input")
        result = await func(message, _TenantGuardContext(ctx, tenant))
        if result is None:
            return None
        if not isinstance(result, Message):
            # Wrap plain results so headers (and the tenant) travel to the next node.
            return message.model_copy(update={"payload": result})
        _check_tenant(result, tenant, "output")
        return result

    return guarded


def _guard_graph(graph: FlowGraph, tenant: str) -> None:
    seen: set[int] = set()
    for node, successors in graph:
        for each in (node, *successors):
            if id(each) not in seen:
                seen.add(id(each))
                each.func = _guard(each.func, tenant)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    text = getattr(value, "text", None)
    if type(value).__name__ == "FinalAnswer" and isinstance(text, str):
        return text
    return value


def _error_outcome(exc: BaseException | None, fallback: str) -> Outcome:
    if isinstance(exc, GatewayError):
        status = Status.TIMED_OUT if isinstance(exc, JobTimeout) else Status.FAILED
        counts = getattr(exc, "counts_attempt", True)
        after = getattr(exc, "retry_after_s", None)
        return Outcome(status, None, exc.code, str(exc)[:500], exc.retryable, counts, after)
    if isinstance(exc, TimeoutError):
        return Outcome(Status.TIMED_OUT, None, "node_timeout", "a node timed out", True)
    if exc is None:
        return Outcome(Status.FAILED, None, "job_error", fallback[:500], True)
    return Outcome(Status.FAILED, None, "job_error", f"{type(exc).__name__}: {exc}"[:500], True)


def _interpret(item: Any, tenant: str) -> Outcome:
    if isinstance(item, FlowError):
        original = item.unwrap()
        if isinstance(original, FlowError):
            original = None
        if original is None and item.code == "NODE_TIMEOUT":
            return Outcome(Status.TIMED_OUT, None, "node_timeout", item.message, True)
        return _error_outcome(original, item.message)
    if isinstance(item, Message):
        if item.headers.tenant != tenant:
            return _error_outcome(TenantViolation("result: message for another tenant"), "")
        item = item.payload
    result = _plain(item)
    try:
        dumps(result)
    except (TypeError, ValueError):
        return Outcome(
            Status.FAILED, None, "invalid_result", "the flow's result is not JSON-serialisable"
        )
    return Outcome(Status.SUCCEEDED, result)


async def run_job(
    ctx: JobContext,
    factory: FlowFactory,
    *,
    cancel: asyncio.Event,
    middlewares: Sequence[Middleware] = (),
) -> Outcome:
    """Run one attempt of a job in its own flow, bounded by its deadline.

    To cancel a job on request, set `cancel` and then cancel the task running this
    coroutine: it returns a cancelled outcome. A task cancellation without `cancel`
    set (shutdown, rebalance) stops the flow and propagates the CancelledError.
    """
    try:
        graph = factory(ctx)
        _guard_graph(graph, ctx.tenant)
        flow = create(*graph, emit_errors_to_rookery=True, middlewares=list(middlewares))
    except Exception as exc:  # noqa: BLE001  # a user factory may raise anything; the job fails
        return _error_outcome(exc, "flow factory failed")
    if cancel.is_set():
        return _CANCELLED
    message = Message(
        payload=dict(ctx.payload),
        headers=Headers(tenant=ctx.tenant),
        trace_id=ctx.trace_id,
        deadline_s=ctx.deadline_at,
    )
    loop = asyncio.get_running_loop()
    flow.run()
    try:
        # One timer on the loop, no helper tasks: this path runs for every job.
        async with asyncio.timeout_at(loop.time() + (ctx.deadline_at - time.time())):
            await flow.emit(message)
            item = await flow.fetch()
        return _interpret(item, ctx.tenant)
    except TimeoutError:
        await _cancel_trace(flow, ctx.trace_id)
        return _TIMED_OUT
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if cancel.is_set() and task is not None and task.uncancel() == 0:
            await _cancel_trace(flow, ctx.trace_id)
            return _CANCELLED
        raise
    finally:
        await _stop(flow)


_CANCELLED = Outcome(Status.CANCELLED, None, "cancelled", "cancelled on request", False)
_TIMED_OUT = Outcome(Status.TIMED_OUT, None, "deadline_exceeded", "job deadline exceeded", True)


async def _cancel_trace(flow: Any, trace_id: str) -> None:
    # Drops the trace's queued messages and cancels its running node invocation.
    with contextlib.suppress(RuntimeError):
        await asyncio.wait_for(flow.cancel(trace_id), timeout=_STOP_TIMEOUT_S)


async def _stop(flow: Any) -> None:
    # Shielded: a job cancelled by shutdown must still release its flow's tasks.
    stopping = asyncio.ensure_future(flow.stop())
    try:
        await asyncio.wait_for(asyncio.shield(stopping), timeout=_STOP_TIMEOUT_S)
    except TimeoutError:
        stopping.cancel()
    except asyncio.CancelledError:
        await asyncio.wait({stopping}, timeout=_STOP_TIMEOUT_S)
        raise
