"""The per-job PenguiFlow runner: one flow per attempt, guarded, bounded, scrubbed.

`run_job` builds the job type's graph for one job, wraps a *copy* of every node so each
message it receives or emits carries the job's tenant (invariant 2), bounds the run by
the job's deadline, and turns what the flow's Rookery delivers into an `Outcome`.
`Runner` does that for a job on its way through the gateway: it builds the job's
context and secret reader, and scrubs every secret value the job received (and its
escaped forms) from the result and the error text before the text is cut to length.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from penguiflow import Headers, Message, Node, create
from penguiflow.errors import FlowError
from pydantic import BaseModel

from gateway.catalog import Catalog
from gateway.entry import Entry
from gateway.errors import GatewayError, JobTimeout, TenantViolation
from gateway.flows import FlowFactory, FlowGraph, JobContext, JobTypes
from gateway.metrics import Metrics
from gateway.observability import flow_event_middleware
from gateway.records import Status, dumps
from gateway.vault import SecretStore, redact

__all__ = ["Outcome", "Runner", "run_job"]

Middleware = Callable[[Any], Awaitable[None]]
# PenguiFlow logs every node error with the exception's repr and traceback, which can
# carry payload data or secret values; the gateway reports FlowEvents through its own
# middleware instead (gateway.observability), so the library's logger stays silent.
logging.getLogger("penguiflow").setLevel(logging.CRITICAL + 1)

# How long flow.stop() may take once a job is over; a node that ignores
# cancellation must not hold its slot forever.
_STOP_TIMEOUT_S = 5.0
# Error texts in results are cut to this many characters (after scrubbing).
MAX_ERROR_TEXT = 500


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


CANCELLED = Outcome(Status.CANCELLED, None, "cancelled", "cancelled on request", False)
_TIMED_OUT = Outcome(Status.TIMED_OUT, None, "deadline_exceeded", "job deadline exceeded", True)


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


def _guard_graph(graph: FlowGraph, tenant: str) -> list[tuple[Node, list[Node]]]:
    """The graph with every node replaced by a guarded copy; the factory's own nodes are
    left as they were, so a factory that reuses nodes across jobs stays correct."""
    copies: dict[int, Node] = {}

    def guarded(node: Node) -> Node:
        found = copies.get(id(node))
        if found is None:
            found = copy.copy(node)
            found.func = _guard(node.func, tenant)
            copies[id(node)] = found
        return found

    return [(guarded(node), [guarded(each) for each in successors]) for node, successors in graph]


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    text = getattr(value, "text", None)
    if type(value).__name__ == "FinalAnswer" and isinstance(text, str):
        return text
    return value


def _error_outcome(exc: BaseException | None, fallback: str) -> Outcome:
    # Messages are kept whole here: they are scrubbed of secrets, then cut, by Runner.
    if isinstance(exc, GatewayError):
        status = Status.TIMED_OUT if isinstance(exc, JobTimeout) else Status.FAILED
        counts = getattr(exc, "counts_attempt", True)
        after = getattr(exc, "retry_after_s", None)
        return Outcome(status, None, exc.code, str(exc), exc.retryable, counts, after)
    if isinstance(exc, TimeoutError):
        return Outcome(Status.TIMED_OUT, None, "node_timeout", "a node timed out", True)
    if exc is None:
        return Outcome(Status.FAILED, None, "job_error", fallback, True)
    return Outcome(Status.FAILED, None, "job_error", f"{type(exc).__name__}: {exc}", True)


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
    except (TypeError, ValueError, RecursionError):
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
        graph = _guard_graph(factory(ctx), ctx.tenant)
        flow = create(*graph, emit_errors_to_rookery=True, middlewares=list(middlewares))
    except Exception as exc:  # noqa: BLE001  # a user factory may raise anything; the job fails
        return _error_outcome(exc, "flow factory failed")
    if cancel.is_set():
        return CANCELLED
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
            return CANCELLED
        raise
    finally:
        await _stop(flow)


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


def finish_outcome(outcome: Outcome, secrets: frozenset[str]) -> Outcome:
    """The outcome as it may be published: every secret value the job received (and its
    escaped forms) masked in the result and error text, then the text cut to length.
    Scrubbing first means a secret that straddles the cut cannot leave half of itself."""
    if secrets:
        outcome = dataclasses.replace(
            outcome,
            result=redact(outcome.result, secrets),
            error_message=redact(outcome.error_message, secrets),
        )
    message = outcome.error_message
    if message is not None and len(message) > MAX_ERROR_TEXT:
        outcome = dataclasses.replace(outcome, error_message=message[:MAX_ERROR_TEXT])
    return outcome


class Runner:
    """Runs one attempt of a job: its context, its tenant's secrets, its flow."""

    def __init__(
        self,
        *,
        catalog: Callable[[], Catalog],
        job_types: JobTypes,
        secrets: SecretStore | None,
        metrics: Metrics | None,
    ) -> None:
        self._catalog = catalog
        self._types = job_types
        self._secrets = secrets
        self._metrics = metrics

    def _node_latency(self, tenant: str) -> Callable[[str, float], None] | None:
        metrics = self._metrics
        if metrics is None:
            return None

        label = metrics.tenant(tenant)

        def observe(node: str, seconds: float) -> None:
            metrics.node_latency.labels(label, metrics.node_name(node)).observe(seconds)

        return observe

    async def run(self, entry: Entry, started: float) -> Outcome:
        """The attempt's outcome, scrubbed; a cancel request is honoured at any point."""
        job = entry.job
        factory = self._types.get(job.type)
        tenant = self._catalog().get(job.tenant)
        if factory is None or tenant is None:
            reason = "unknown_type" if factory is None else "unknown_tenant"
            return Outcome(Status.FAILED, None, reason, "job can no longer run here")
        deadline = job.deadline_s or tenant.jobs.default_deadline_s
        secrets = self._secrets.for_job(job.tenant, job.id) if self._secrets else None
        ctx = JobContext(
            tenant=job.tenant,
            job_id=job.id,
            job_type=job.type,
            attempt=job.attempt,
            payload=job.payload,
            deadline_at=started + deadline,
            base_idempotency_key=job.idempotency_key,
            priority=job.priority,
        )
        if secrets is not None:
            ctx = dataclasses.replace(ctx, secrets=secrets)
        middleware = flow_event_middleware(job, self._node_latency(job.tenant))
        entry.in_flow = True
        try:
            outcome = await run_job(ctx, factory, cancel=entry.cancel, middlewares=[middleware])
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if entry.cancel.is_set() and task is not None and task.uncancel() == 0:
                # A cancel request that landed while the flow was already stopping.
                return CANCELLED
            raise
        finally:
            entry.in_flow = False
        return finish_outcome(outcome, secrets.handed_out if secrets is not None else frozenset())
