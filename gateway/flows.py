"""Job types: names bound to factories that build a fresh PenguiFlow graph for one job.

This is what users extend (see `gateway/__init__.py` for the public names and the
README's "Writing a job type"). The gateway's runner (`gateway.runner`) runs the graph.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from penguiflow import Message, Node, NodePolicy

from gateway.errors import ConfigError, JobError

__all__ = [
    "FlowFactory",
    "FlowGraph",
    "JobContext",
    "JobTypes",
    "SecretReader",
    "builtin_job_types",
    "load_job_types",
]

FlowGraph = Sequence[tuple[Node, Sequence[Node]]]


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
    priority: int = 5
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


async def _echo_node(message: Message, _: Any) -> Any:
    return message.payload


def _number(payload: Mapping[str, Any], name: str, default: float) -> float:
    value = payload.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise JobError(f"payload.{name} must be a number >= 0", retryable=False, code="bad_payload")
    return float(value)


async def _sleep_node(message: Message, _: Any) -> Any:
    seconds = _number(message.payload, "seconds", 0.0)
    await asyncio.sleep(seconds)
    return {"slept_s": seconds}


# Types whose node needs nothing of the job's context share one Node: a Node is only a
# description (function, name, policy; penguiflow keeps a flow's state in the flow), and
# building one inspects the function's signature: 4.8% of the job process's samples in a
# profile (py-spy) of the noisy-neighbour benchmark. Each job still gets its own flow.
_ECHO = _single_node("echo", _echo_node)
_SLEEP = _single_node("sleep", _sleep_node)


def _echo(ctx: JobContext) -> FlowGraph:
    return _ECHO


def _sleep(ctx: JobContext) -> FlowGraph:
    return _SLEEP


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
