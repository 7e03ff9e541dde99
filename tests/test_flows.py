"""The per-job runner: outcomes, deadlines, cancellation and the tenant guard (real PenguiFlow)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from penguiflow import Headers, Message, Node, NodePolicy

from gateway.flows import FlowGraph, JobContext, JobTypes, builtin_job_types
from gateway.records import Status
from gateway.runner import run_job

TYPES = builtin_job_types()


def ctx(
    job_type: str, payload: dict[str, Any], *, deadline_s: float = 5.0, attempt: int = 1
) -> JobContext:
    return JobContext(
        tenant="acme",
        job_id="j1",
        job_type=job_type,
        attempt=attempt,
        payload=payload,
        deadline_at=time.time() + deadline_s,
    )


async def run(job_type: str, payload: dict[str, Any], types: JobTypes = TYPES, **kw: Any) -> Any:
    factory = types.get(job_type)
    assert factory is not None
    return await run_job(ctx(job_type, payload, **kw), factory, cancel=asyncio.Event())


async def test_echo_returns_payload() -> None:
    outcome = await run("echo", {"a": [1, 2]})
    assert outcome.status == Status.SUCCEEDED
    assert outcome.result == {"a": [1, 2]}


async def test_fail_kinds() -> None:
    permanent = await run("fail", {})
    assert (permanent.status, permanent.retryable, permanent.error_code) == (
        Status.FAILED,
        False,
        "requested_failure",
    )
    retryable = await run("fail", {"retryable": True})
    assert retryable.retryable
    healed = await run("fail", {"retryable": True, "succeed_on_attempt": 2}, attempt=2)
    assert healed.status == Status.SUCCEEDED


async def test_deadline_times_out_and_the_node_really_stops() -> None:
    stopped = asyncio.Event()
    types = JobTypes()

    def factory(_: JobContext) -> FlowGraph:
        async def slow(message: Message, _: Any) -> Any:
            try:
                await asyncio.sleep(30)
            finally:
                stopped.set()
            return message

        return [(Node(slow, name="slow", policy=NodePolicy(validate="none")), [])]

    types.register("slow", factory)
    started = time.monotonic()
    outcome = await run("slow", {}, types=types, deadline_s=0.3)
    assert outcome.status == Status.TIMED_OUT
    assert outcome.retryable
    assert time.monotonic() - started < 3
    assert stopped.is_set()


async def test_cancel_event_cancels_a_running_sleep() -> None:
    factory = TYPES.get("sleep")
    assert factory is not None
    cancel = asyncio.Event()
    task = asyncio.create_task(run_job(ctx("sleep", {"seconds": 30}), factory, cancel=cancel))
    await asyncio.sleep(0.2)
    cancel.set()
    task.cancel()
    outcome = await asyncio.wait_for(task, 5)
    assert outcome.status == Status.CANCELLED


async def test_flow_emitting_for_another_tenant_fails() -> None:
    types = JobTypes()

    def factory(_: JobContext) -> FlowGraph:
        async def sneaky(message: Message, _: Any) -> Any:
            return Message(
                payload={"x": 1}, headers=Headers(tenant="globex"), trace_id=message.trace_id
            )

        return [(Node(sneaky, name="sneaky", policy=NodePolicy(validate="none")), [])]

    types.register("sneaky", factory)
    outcome = await run("sneaky", {}, types=types)
    assert outcome.status == Status.FAILED
    assert outcome.error_code == "tenant_violation"
    assert not outcome.retryable


async def test_ctx_emit_for_another_tenant_fails() -> None:
    types = JobTypes()

    def factory(_: JobContext) -> FlowGraph:
        async def passthrough(message: Message, _: Any) -> Any:
            return message

        second = Node(passthrough, name="second", policy=NodePolicy(validate="none"))

        async def first(message: Message, context: Any) -> None:
            await context.emit(
                Message(payload={}, headers=Headers(tenant="initech"), trace_id=message.trace_id)
            )

        return [
            (Node(first, name="first", policy=NodePolicy(validate="none")), [second]),
            (second, []),
        ]

    types.register("two", factory)
    outcome = await run("two", {}, types=types)
    assert outcome.error_code == "tenant_violation"


async def test_multi_node_flow_keeps_tenant() -> None:
    types = JobTypes()
    seen: list[str] = []

    def factory(_: JobContext) -> FlowGraph:
        async def add(message: Message, _: Any) -> Any:
            seen.append(message.headers.tenant)
            return {"n": message.payload.get("n", 0) + 1}

        a = Node(add, name="a", policy=NodePolicy(validate="none"))
        b = Node(add, name="b", policy=NodePolicy(validate="none"))
        return [(a, [b]), (b, [])]

    types.register("chain", factory)
    outcome = await run("chain", {"n": 1}, types=types)
    assert outcome.result == {"n": 3}
    assert seen == ["acme", "acme"]


async def test_a_factory_that_reuses_its_nodes_stays_correct_across_tenants() -> None:
    # The guard wraps copies: the factory's own nodes are never rewrapped, so a later
    # job of another tenant does not fail the first tenant's tenant check.
    async def double(message: Message, _: Any) -> Any:
        return {"n": message.payload["n"] * 2}

    cached = Node(double, name="double", policy=NodePolicy(validate="none"))
    original = cached.func
    types = JobTypes()
    types.register("cached", lambda _: [(cached, [])])
    factory = types.get("cached")
    assert factory is not None
    for tenant, n in (("acme", 1), ("globex", 2), ("acme", 3), ("globex", 4)):
        context = JobContext(tenant, f"j{n}", "cached", 1, {"n": n}, time.time() + 5)
        outcome = await run_job(context, factory, cancel=asyncio.Event())
        assert (outcome.status, outcome.result) == (Status.SUCCEEDED, {"n": 2 * n}), outcome
    assert cached.func is original


async def test_unserialisable_result_fails() -> None:
    types = JobTypes()

    def factory(_: JobContext) -> FlowGraph:
        async def bad(message: Message, _: Any) -> Any:
            return {"when": object()}

        return [(Node(bad, name="bad", policy=NodePolicy(validate="none")), [])]

    types.register("bad", factory)
    outcome = await run("bad", {}, types=types)
    assert outcome.error_code == "invalid_result"


async def test_idempotency_key_is_stable_and_scoped() -> None:
    one = ctx("echo", {})
    again = ctx("echo", {}, attempt=3)
    assert one.idempotency_key("charge") == again.idempotency_key("charge")
    assert one.idempotency_key("charge") != one.idempotency_key("refund")


async def test_no_task_left_behind() -> None:
    before = len(asyncio.all_tasks())
    for _ in range(20):
        await run("echo", {})
    assert len(asyncio.all_tasks()) == before
