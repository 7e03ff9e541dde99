"""The work every peer system does per job: one PenguiFlow flow, like the gateway's built-ins.

Only PenguiFlow and the standard library are imported here, because the
pyrallel-consumer runner imports this module from its own Python 3.12 venv.

A job record is what the gateway's contract says (docs/architecture.md, the topics): header
`tenant`, body `{"id", "type", "payload"}`; the benchmark's bodies also carry
`tenant` (allowed by the contract when it equals the header) so systems that do not
see headers (pyrallel-consumer's WorkItem) still know it. A result record has the job
id as key, the `tenant` header, and a small JSON body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from penguiflow import Headers, Message, Node, NodePolicy, create

__all__ = ["FETCH_TIMEOUT_S", "Job", "job_from_body", "parse_job", "result_value", "run_flow"]

# Bound on one job's flow, like the guide's wait_for around fetch.
FETCH_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Job:
    """One job as a peer system sees it."""

    id: str
    tenant: str
    type: str
    payload: dict[str, Any]


def job_from_body(body: dict[str, Any]) -> Job:
    """The job in a decoded record value (the benchmark only sends well-formed jobs)."""
    return Job(str(body["id"]), str(body.get("tenant", "")), str(body["type"]), body["payload"])


def parse_job(value: bytes) -> Job:
    """The job in a record's value."""
    return job_from_body(json.loads(value))


async def _echo(message: Message, _: Any) -> Any:
    return message.payload


async def _sleep(message: Message, _: Any) -> Any:
    seconds = float(message.payload.get("seconds", 0.0))
    await asyncio.sleep(seconds)
    return {"slept_s": seconds}


_NODES: dict[str, Callable[[Message, Any], Awaitable[Any]]] = {"echo": _echo, "sleep": _sleep}


async def run_flow(job: Job, *, trace_scoped: bool = False) -> Any:
    """Create, run, emit, fetch and stop one flow for the job; its result payload.

    `trace_scoped` uses emit(trace_id=...)/fetch(trace_id=...) as the PenguiFlow
    worker guide recommends; otherwise the plain emit/fetch the gateway uses (one
    flow per job needs no trace demultiplexing), which is cheaper.
    """
    node = Node(_NODES[job.type], name=job.type, policy=NodePolicy(validate="none"))
    flow = create((node, []))
    flow.run()
    try:
        trace_id = f"job-{job.id}"
        message = Message(
            payload=job.payload, headers=Headers(tenant=job.tenant), trace_id=trace_id
        )
        if trace_scoped:
            await flow.emit(message, trace_id=trace_id)
            result = await asyncio.wait_for(flow.fetch(trace_id=trace_id), FETCH_TIMEOUT_S)
        else:
            await flow.emit(message)
            result = await asyncio.wait_for(flow.fetch(), FETCH_TIMEOUT_S)
    finally:
        await flow.stop()
    return getattr(result, "payload", result)


def result_value(job: Job, result: Any) -> bytes:
    """The body of a job's result record."""
    return json.dumps(
        {"id": job.id, "tenant": job.tenant, "status": "succeeded", "result": result}
    ).encode()
