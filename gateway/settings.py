"""Settings, parsed once at the edge into frozen objects (prefix GATEWAY_, delimiter __)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = [
    "MAX_WORKERS",
    "ClusterSettings",
    "ControlSettings",
    "HttpSettings",
    "KafkaSettings",
    "LoopGuardSettings",
    "OpsSettings",
    "ParkingSettings",
    "RetrySettings",
    "Settings",
    "TopicSettings",
    "VaultSettings",
    "child_env",
    "load_settings",
    "parse_workers",
    "usable_cores",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(BaseModel):
    """Broker connection and consumer-group tuning."""

    model_config = _FROZEN

    bootstrap_servers: str = "localhost:9092"
    group_id: str = "gateway"
    client_id: str = "gateway"
    # aiokafka's default is 500; brokers that wait the whole time (Tansu) add that much latency.
    fetch_max_wait_ms: int = Field(default=100, ge=0, le=60_000)
    max_poll_records: int = Field(default=500, ge=1)
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    rebalance_timeout_ms: int = Field(default=30_000, ge=1_000)
    request_timeout_ms: int = Field(default=30_000, ge=1_000)
    linger_ms: int = Field(default=2, ge=0)
    # Producer batch size per partition (aiokafka's default is 16 KiB).
    max_batch_bytes: int = Field(default=262_144, ge=16_384)
    commit_interval_ms: int = Field(default=500, ge=10)
    produce_timeout_s: float = Field(default=30.0, gt=0)
    # The broker's limit on one record (message.max.bytes): nothing the gateway writes
    # is larger; a result that would be becomes a `result_too_large` failure.
    max_request_bytes: int = Field(default=1_048_576, ge=65_536)
    # At start, how long to keep trying to reach the broker (pods often start first).
    startup_timeout_s: float = Field(default=60.0, gt=0)
    # No write acknowledged for this long: the broker is declared unreachable (one log
    # line, gateway_broker_up 0); for `not_ready_after_s`: /readyz answers 503.
    unreachable_after_s: float = Field(default=5.0, gt=0)
    not_ready_after_s: float = Field(default=10.0, gt=0)
    # Topics the gateway creates at start when missing (Tansu and dev clusters need it).
    create_topics: bool = True
    partitions: int = Field(default=4, ge=1)


class TopicSettings(BaseModel):
    """Names of every topic in the contract."""

    model_config = _FROZEN

    jobs: str = "jobs"
    results: str = "jobs.results"
    status: str = "jobs.status"
    control: str = "jobs.control"
    retry: str = "jobs.retry"
    deferred: str = "jobs.deferred"
    dlq: str = "jobs.dlq"

    def all(self) -> tuple[str, ...]:
        """Every topic, input first."""
        return (
            self.jobs,
            self.results,
            self.status,
            self.control,
            self.retry,
            self.deferred,
            self.dlq,
        )


class VaultSettings(BaseModel):
    """How the gateway reaches and authenticates to Vault."""

    model_config = _FROZEN

    addr: str = "http://127.0.0.1:8200"
    token: SecretStr | None = None
    role_id: str | None = None
    secret_id: SecretStr | None = None
    mount: str = "secret"
    approle_mount: str = "approle"
    cache_ttl_s: float = Field(default=300.0, gt=0)
    cache_size: int = Field(default=10_000, ge=1)
    max_stale_s: float = Field(default=600.0, ge=0)
    timeout_s: float = Field(default=5.0, gt=0)
    # Lifetime of the per-tenant tokens the gateway mints (renewed at half, then replaced).
    tenant_token_ttl_s: int = Field(default=900, ge=2)
    # How often the gateway checks its own token (renewing it at a third of its TTL).
    renew_check_s: float = Field(default=60.0, gt=0)
    max_workers: int = Field(default=8, ge=1)
    # At start, how long to keep trying to reach Vault.
    startup_timeout_s: float = Field(default=60.0, gt=0)
    enabled: bool = True

    @property
    def configured(self) -> bool:
        """Vault is on and the gateway has credentials for it."""
        return self.enabled and (self.token is not None or self.role_id is not None)


class HttpSettings(BaseModel):
    """Control API listener."""

    model_config = _FROZEN

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    enabled: bool = True
    # Larger request bodies are refused with 413 before they are read in full.
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    # Result records kept for GET, bounded by their total size (least recently used go).
    result_cache_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # Connections served at once; more are answered 503.
    max_connections: int = Field(default=1024, ge=1)
    # Bound on finishing requests under way when the gateway stops.
    shutdown_timeout_s: float = Field(default=5.0, gt=0)


class OpsSettings(BaseModel):
    """The operators' listener: metrics, health and the admin API (never the tenant port)."""

    model_config = _FROZEN

    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)
    enabled: bool = True
    # Bearer token for /admin/v1; without one the admin API is off.
    token: SecretStr | None = None
    # Where the CLI's admin commands reach the ops listener.
    url: str = "http://127.0.0.1:9464"


class ControlSettings(BaseModel):
    """Commands from `jobs.control`: cancels for jobs this replica does not hold (yet),
    and paused tenants."""

    model_config = _FROZEN

    # A cancel for a job not held here is remembered this long, so it wins when the job
    # arrives (from jobs, jobs.retry or jobs.deferred); older control records are ignored.
    cancel_ttl_s: float = Field(default=600.0, gt=0)
    max_pending_cancels: int = Field(default=100_000, ge=1)
    # A paused tenant's jobs go around jobs.deferred about this often until it resumes.
    paused_recheck_s: float = Field(default=15.0, gt=0)


class ClusterSettings(BaseModel):
    """How replicas share every tenant's quota (`gateway.shares`)."""

    model_config = _FROZEN

    # How often each replica reports its demand and recomputes its shares.
    demand_interval_s: float = Field(default=0.5, gt=0)
    # A replica not heard from for this long no longer counts.
    peer_timeout_s: float = Field(default=3.0, gt=0)
    # The least share of a tenant's rate a replica with demand takes.
    share_floor: float = Field(default=0.05, ge=0, le=1)


class ParkingSettings(BaseModel):
    """Overflow left in place on `jobs` and read again by offset (`gateway.parking`)."""

    model_config = _FROZEN

    # Parked records per replica past which overflow goes to jobs.deferred at once
    # (0: never park). Each costs about 200 bytes of memory, whatever the record's size.
    max_records: int = Field(default=100_000, ge=0)
    # A record parked this long is written to jobs.deferred, so no partition's commit
    # waits longer than this behind one tenant's backlog.
    max_age_s: float = Field(default=60.0, gt=0)


class LoopGuardSettings(BaseModel):
    """The adaptive cap on running jobs while the event loop is saturated
    (`gateway.loadguard`)."""

    model_config = _FROZEN

    # Off by default: it trades throughput (a flood's halved beside a quiet tenant, and
    # 0-18% of one tenant's `echo` measured here) for shorter waits of quiet tenants on
    # a saturated process (see README).
    enabled: bool = False
    # How late a timer may fire, smoothed, before a busy loop counts as saturated. A job
    # waits a turn of the loop at each of its dozen or so steps, so a few milliseconds of
    # lag already cost a quiet tenant tens (measured: 10 ms let its p99 reach 190 ms).
    lag_target_s: float = Field(default=0.002, gt=0)
    # The share of the time the loop's thread must be on a CPU for its lag to count
    # (below it the lag comes from outside the process, and fewer jobs would not help).
    busy_threshold: float = Field(default=0.8, gt=0, le=1)
    # The cap never falls below this many running jobs (nor above `max_inflight`).
    min_slots: int = Field(default=8, ge=1)
    # How often the loop is measured.
    interval_s: float = Field(default=0.025, gt=0)


class RetrySettings(BaseModel):
    """Exponential backoff with full jitter for jobs.retry."""

    model_config = _FROZEN

    base_s: float = Field(default=1.0, ge=0)
    factor: float = Field(default=2.0, ge=1)
    cap_s: float = Field(default=300.0, ge=0)
    jitter: float = Field(default=0.5, ge=0, le=1)
    max_attempts: int = Field(default=5, ge=1, le=100)


def _default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# Most job processes one `gateway run` starts (`--workers`, GATEWAY_WORKERS).
MAX_WORKERS = 256


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def parse_workers(value: object) -> int:
    """A worker count from `--workers` or GATEWAY_WORKERS: 1 to MAX_WORKERS, or `auto`
    (one per usable core, at most MAX_WORKERS); ValueError naming what is accepted."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return min(usable_cores(), MAX_WORKERS)
        value = int(text) if text.isdigit() else None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"workers must be a whole number from 1 to {MAX_WORKERS}, or 'auto'")
    return value


class Settings(BaseSettings):
    """Everything the gateway reads from its environment (and .env)."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    vault: VaultSettings = VaultSettings()
    http: HttpSettings = HttpSettings()
    ops: OpsSettings = OpsSettings()
    control: ControlSettings = ControlSettings()
    cluster: ClusterSettings = ClusterSettings()
    parking: ParkingSettings = ParkingSettings()
    retry: RetrySettings = RetrySettings()
    loop_guard: LoopGuardSettings = LoopGuardSettings()
    tenants_dir: Path = Path("tenants")
    policies_dir: Path = Path("policies")
    max_inflight: int = Field(default=256, ge=1)
    # Unfinished records in memory past which partitions pause (a last resort), by
    # count and by bytes (key + value), whichever comes first. Two budgets of this size:
    # fresh jobs pause the `jobs` partitions past it, and the jobs.retry/jobs.deferred
    # partitions share the other (each pauses alone past its share).
    max_buffered: int = Field(default=50_000, ge=1)
    max_buffered_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # A job's value; past it `payload_too_large`. Its copies (retry, deferral) carry
    # headers too, so the limit in force is at most the record limit less 17.5 KiB.
    max_payload_bytes: int = Field(default=1_000_000, ge=1)
    # Upper bound on any delay the gateway books (retry backoff, deferral), and on how
    # far in the future a record's `not-before` may lie.
    max_delay_s: float = Field(default=86_400.0, gt=0)
    flows: Annotated[tuple[str, ...], NoDecode] = ()
    replica: str = Field(default_factory=_default_replica)
    log_format: str = Field(default="auto", pattern="^(auto|json|plain)$")
    log_level: str = "INFO"
    # How often tenants/ and quotas.toml are checked for changes (0: only on SIGHUP).
    catalog_poll_s: float = Field(default=2.0, ge=0)
    # Garbage collector: generation-0 threshold for `gateway run` (0 keeps Python's 700).
    # Every job makes short-lived cycles (tasks, futures, flow contexts); collecting
    # them 700 allocations at a time cost about 40% of the gateway's CPU.
    gc_threshold: int = Field(default=20_000, ge=0)
    # Tenants with series of their own in the metrics (the rest are `tenant="other"`).
    max_tenant_series: int = Field(default=200, ge=1)
    # Terminal job ids remembered to skip redelivered work (idempotency).
    history_size: int = Field(default=200_000, ge=1)
    # Job processes `gateway run` keeps on this machine, each a member of the consumer
    # group (`gateway.worker`); `auto`: one per usable core. The CLI's --workers wins.
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)

    @field_validator("flows", mode="before")
    @classmethod
    def _split_flows(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _parse_workers(cls, value: object) -> int:
        return parse_workers(value)

    @model_validator(mode="after")
    def _check_vault_auth(self) -> Settings:
        vault = self.vault
        if (vault.role_id is None) != (vault.secret_id is None):
            raise ValueError("vault.role_id and vault.secret_id must be set together")
        return self


def load_settings(**overrides: object) -> Settings:
    """Parse the environment once; keyword overrides win (used by the CLI and tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]  # pydantic accepts nested dicts


_PREFIX = "GATEWAY_"


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def child_env(settings: Settings, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment under which a child process (`python -m gateway run`) loads
    exactly `settings`: this process's environment without its GATEWAY_* variables,
    every setting as GATEWAY_* (but `replica`: each process names itself), then
    `overrides` (full variable names).

    Secrets are written in clear, since the child needs them: the result goes to a
    child's environment and nowhere else (never a log). A setting that is None here
    has no variable, so a `.env` file in the child's directory could still fill it.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PREFIX)}
    for name, value in settings:
        if name == "replica" or value is None:
            continue
        if isinstance(value, BaseModel):
            for field, inner in value:
                if inner is not None:
                    env[f"{_PREFIX}{name.upper()}__{field.upper()}"] = _env_value(inner)
        else:
            env[f"{_PREFIX}{name.upper()}"] = _env_value(value)
    env.update(overrides or {})
    return env
