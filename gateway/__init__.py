"""Multi-tenant worker gateway: Kafka jobs, quotas, secrets, one PenguiFlow flow per job.

The public API is what a job type needs (README, "Writing a job type"; `examples/`):

    from gateway import FlowGraph, JobContext, JobError, JobTypes, Message, Node, NodePolicy

    def register(types: JobTypes) -> None:
        types.register("resize", resize_flow)

Everything else in the package is the gateway's own and may change between releases.
The names are loaded on first use, so `import gateway` stays light for the processes
that never run a flow (the API process, `gateway tenants check`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from penguiflow import Headers, Message, Node, NodePolicy

    from gateway.errors import JobError
    from gateway.flows import FlowFactory, FlowGraph, JobContext, JobTypes, SecretReader

__all__ = [
    "FlowFactory",
    "FlowGraph",
    "Headers",
    "JobContext",
    "JobError",
    "JobTypes",
    "Message",
    "Node",
    "NodePolicy",
    "SecretReader",
    "__version__",
]

__version__ = "0.1.0"

_HOMES = {
    "FlowFactory": "gateway.flows",
    "FlowGraph": "gateway.flows",
    "JobContext": "gateway.flows",
    "JobTypes": "gateway.flows",
    "SecretReader": "gateway.flows",
    "JobError": "gateway.errors",
    "Headers": "penguiflow",
    "Message": "penguiflow",
    "Node": "penguiflow",
    "NodePolicy": "penguiflow",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
