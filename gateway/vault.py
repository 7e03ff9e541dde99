"""Tenant secrets from Vault: scoped tokens, a bounded cache and redacted per-job access.

The gateway's own token (or AppRole login) can only mint tokens through the per-tenant
token roles that `gateway vault bootstrap` creates. Every read for a job uses a
short-lived token of the job's tenant, so Vault itself refuses a cross-tenant read.
Values are cached per (tenant, path) for `cache_ttl_s`; while Vault is unreachable,
cached values keep serving for up to `max_stale_s` more. hvac is synchronous: every
call runs on a small thread pool and is bounded by `timeout_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import hvac
import hvac.exceptions
import requests
from cachetools import TTLCache
from pydantic_core import core_schema

from gateway.errors import (
    ConfigError,
    JobError,
    SecretForbidden,
    SecretNotFound,
    SecretsUnavailable,
)
from gateway.settings import VaultSettings
from gateway.tasks import Supervisor

__all__ = [
    "JobSecrets",
    "SecretStore",
    "VaultStats",
    "redact",
    "tenant_policy_name",
    "tenant_role_name",
]

log = logging.getLogger("gateway.vault")
audit = logging.getLogger("gateway.audit")

T = TypeVar("T")

_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_REDACTED = "[redacted]"
# Failures that mean "Vault did not answer properly", not "Vault said no".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    requests.exceptions.RequestException,
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.RateLimitExceeded,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.UnexpectedError,
    TimeoutError,
    OSError,
)
_DENIED = (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)


def tenant_policy_name(tenant: str) -> str:
    """The ACL policy rendered from policies/vault/tenant.hcl for a tenant."""
    return f"gateway-tenant-{tenant}"


def tenant_role_name(tenant: str) -> str:
    """The token role the gateway mints a tenant's tokens through."""
    return f"gateway-tenant-{tenant}"


def tenant_secret_path(tenant: str, path: str) -> str:
    """KV v2 path (below the mount) of a tenant's secret; refuses anything that leaves it."""
    segments = path.split("/")
    if not path or not all(_PATH_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
        raise SecretForbidden(f"secret path {path!r} is not a path below the tenant's own")
    return f"tenants/{tenant}/{path}"


@dataclass(slots=True)
class VaultStats:
    """Counters for metrics and benchmarks (no values, no paths)."""

    reads: int = 0
    cache_hits: int = 0
    cache_misses: int = 0  # lookups that started a Vault read
    cache_coalesced: int = 0  # lookups that joined a read already in flight
    stale_served: int = 0
    tokens_minted: int = 0
    token_renewals: int = 0
    logins: int = 0
    failures: int = 0
    forbidden: int = 0

    @property
    def hit_ratio(self) -> float:
        """Share of secret lookups that needed no Vault read of their own (answered from
        the cache, or by joining a read already in flight)."""
        total = self.cache_hits + self.cache_misses + self.cache_coalesced
        return (self.cache_hits + self.cache_coalesced) / total if total else 0.0


@dataclass(slots=True)
class _Token:
    value: str = field(repr=False)
    expires_at: float
    renew_at: float
    renewable: bool
    client: hvac.Client = field(repr=False)


@dataclass(frozen=True, slots=True)
class _Cached:
    values: Mapping[str, str] = field(repr=False)
    fetched_at: float


class SecretStore:
    """The gateway's Vault session: its own login, tenant tokens and the secret cache."""

    def __init__(
        self,
        settings: VaultSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        supervisor: Supervisor | None = None,
    ):
        if settings.token is None and settings.role_id is None:
            raise ConfigError("vault: set GATEWAY_VAULT__TOKEN or ROLE_ID and SECRET_ID")
        self._settings = settings
        self._clock = clock
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._pool = ThreadPoolExecutor(settings.max_workers, thread_name_prefix="vault")
        self._client = self._new_client(
            settings.token.get_secret_value() if settings.token is not None else None
        )
        self._gateway_expires_at: float | None = None
        self._login_lock = asyncio.Lock()
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        # Entries live until TTL + max_stale: past TTL they only serve during an outage.
        self._cache: TTLCache[tuple[str, str], _Cached] = TTLCache(
            maxsize=settings.cache_size,
            ttl=settings.cache_ttl_s + settings.max_stale_s,
            timer=clock,
        )
        self._inflight: dict[tuple[str, str], asyncio.Task[Mapping[str, str]]] = {}
        self._outage_since: float | None = None
        self._last_ok: float | None = None
        self._last_error = "no answer"
        self._renewer: asyncio.Task[None] | None = None
        self.stats = VaultStats()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Authenticate and start keeping the gateway's own token alive.

        Vault being unreachable is not fatal (jobs retry until it answers); Vault
        refusing the gateway's credentials is.
        """
        settings = self._settings
        deadline = self._clock() + settings.startup_timeout_s
        delay = 0.5
        while True:
            try:
                await self._authenticate()
                break
            except SecretsUnavailable:
                left = deadline - self._clock()
                if left <= 0:
                    raise ConfigError(
                        f"Vault at {settings.addr} is unreachable ({self._last_error}) after "
                        f"{settings.startup_timeout_s:g}s: check GATEWAY_VAULT__ADDR (or start "
                        "a local one with `gateway dev up`)"
                    ) from None
                log.warning(
                    "vault_waiting",
                    extra={"addr": settings.addr, "error": self._last_error, "left_s": round(left)},
                )
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)
        self._renewer = self._supervisor.spawn(self._keep_alive(), "gateway:vault-renew")

    async def stop(self) -> None:
        """Stop renewing, revoke nothing (tenant tokens expire on their own), free threads."""
        await self._supervisor.cancel(self._renewer)
        self._renewer = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def available(self) -> bool:
        """Vault answered the last call (False during an outage)."""
        return self._outage_since is None and self._last_ok is not None

    @property
    def ready(self) -> bool:
        """Able to serve secrets now: Vault answers, or the cache holds something."""
        return self.available or len(self._cache) > 0

    def for_job(self, tenant: str, job_id: str) -> JobSecrets:
        """The redacted secret reader handed to one job's flow."""
        return JobSecrets(self, tenant, job_id)

    # -- reads ---------------------------------------------------------------

    async def read(self, tenant: str, path: str) -> Mapping[str, str]:
        """All keys of a tenant's secret, from the cache when fresh (single flight on a miss)."""
        full = tenant_secret_path(tenant, path)
        key = (tenant, full)
        cached = self._cache.get(key)
        now = self._clock()
        if cached is not None and now - cached.fetched_at < self._settings.cache_ttl_s:
            self.stats.cache_hits += 1
            return cached.values
        task = self._inflight.get(key)
        if task is not None:
            self.stats.cache_coalesced += 1
        else:
            self.stats.cache_misses += 1
            task = asyncio.create_task(self._load(key, cached), name="gateway:vault-read")
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # Shielded: one job being cancelled must not fail the others waiting on the read.
        return await asyncio.shield(task)

    async def read_as(self, tenant: str, full_path: str) -> Mapping[str, str]:
        """Read any path with the tenant's token, bypassing the gateway's own path check.

        For tests and audits that prove Vault itself refuses what the tenant must not read.
        """
        return await self._fetch(tenant, full_path)

    async def _load(self, key: tuple[str, str], cached: _Cached | None) -> Mapping[str, str]:
        tenant, full = key
        try:
            values = await self._fetch(tenant, full)
        except SecretsUnavailable:
            limit = self._settings.cache_ttl_s + self._settings.max_stale_s
            if cached is not None and self._clock() - cached.fetched_at < limit:
                self.stats.stale_served += 1
                return cached.values
            raise
        self._cache[key] = _Cached(values, self._clock())
        return values

    async def _fetch(self, tenant: str, full_path: str) -> Mapping[str, str]:
        for attempt in (1, 2):
            token = await self._tenant_token(tenant)
            try:
                response = await self._call(
                    token.client.secrets.kv.v2.read_secret_version,
                    path=full_path,
                    mount_point=self._settings.mount,
                    raise_on_deleted_version=True,
                )
            except hvac.exceptions.InvalidPath:
                raise SecretNotFound(f"secret {full_path!r} does not exist") from None
            except _DENIED:
                # Vault answers 403 for a denied path and for an expired or revoked
                # token alike: try once more with a freshly minted token.
                self._tokens.pop(tenant, None)
                if attempt == 1:
                    continue
                self.stats.forbidden += 1
                message = f"Vault refused the tenant's token for {full_path!r}"
                raise SecretForbidden(message) from None
            self.stats.reads += 1
            data = response.get("data", {}).get("data") or {}
            return {str(k): str(v) for k, v in data.items()}
        raise AssertionError("unreachable")  # pragma: no cover

    # -- tokens --------------------------------------------------------------

    async def _tenant_token(self, tenant: str) -> _Token:
        token = self._tokens.get(tenant)
        now = self._clock()
        if token is not None and now < token.renew_at:
            return token
        lock = self._token_locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            token = self._tokens.get(tenant)
            now = self._clock()
            if token is not None and now < token.renew_at:
                return token
            if token is not None and token.renewable and now < token.expires_at:
                renewed = await self._renew_tenant_token(token)
                if renewed is not None:
                    self._tokens[tenant] = renewed
                    return renewed
            token = await self._mint(tenant)
            self._tokens[tenant] = token
            return token

    async def _renew_tenant_token(self, token: _Token) -> _Token | None:
        ttl = self._settings.tenant_token_ttl_s
        try:
            response = await self._call(token.client.auth.token.renew_self, increment=f"{ttl}s")
        except _DENIED:
            return None
        lease = float(response["auth"]["lease_duration"])
        self.stats.token_renewals += 1
        if lease < ttl / 2:
            return None  # near its maximum lifetime: replace it instead
        return self._token_from(token.value, lease, token.renewable, token.client)

    async def _mint(self, tenant: str) -> _Token:
        ttl = self._settings.tenant_token_ttl_s
        for attempt in (1, 2):
            try:
                response = await self._call(
                    self._client.auth.token.create,
                    role_name=tenant_role_name(tenant),
                    policies=[tenant_policy_name(tenant)],
                    ttl=f"{ttl}s",
                    renewable=True,
                    display_name=f"tenant-{tenant}",
                    meta={"tenant": tenant},
                )
            except _DENIED:
                # The gateway's own token expired or was revoked: log in again once.
                if attempt == 1 and self._settings.role_id is not None:
                    await self._relogin()
                    continue
                log.error("vault_token_mint_refused", extra={"tenant": tenant})
                raise SecretsUnavailable("Vault refused to mint the tenant's token") from None
            except hvac.exceptions.InvalidRequest:
                # Unknown role: the tenant was not bootstrapped (yet). An operator problem,
                # not the job's: retry rather than fail.
                log.error("vault_tenant_role_missing", extra={"tenant": tenant})
                raise SecretsUnavailable(
                    f"no Vault token role for tenant {tenant!r}: run `gateway vault bootstrap`"
                ) from None
            auth = response["auth"]
            self.stats.tokens_minted += 1
            value = auth["client_token"]
            client = self._new_client(value)
            return self._token_from(value, float(auth["lease_duration"]), auth["renewable"], client)
        raise AssertionError("unreachable")  # pragma: no cover

    def _token_from(self, value: str, lease: float, renewable: bool, client: hvac.Client) -> _Token:
        now = self._clock()
        return _Token(
            value=value,
            expires_at=now + lease,
            renew_at=now + lease / 2,
            renewable=bool(renewable),
            client=client,
        )

    # -- the gateway's own token --------------------------------------------

    async def _authenticate(self, *, force: bool = False) -> None:
        async with self._login_lock:
            settings = self._settings
            if settings.role_id is not None and settings.secret_id is not None:
                if not force and self._client.token and self._gateway_expires_at is not None:
                    return
                try:
                    response = await self._call(
                        self._client.auth.approle.login,
                        role_id=settings.role_id,
                        secret_id=settings.secret_id.get_secret_value(),
                        mount_point=settings.approle_mount,
                    )
                except (*_DENIED, hvac.exceptions.InvalidRequest):
                    raise ConfigError(
                        f"Vault at {settings.addr} refused the gateway's AppRole login: check "
                        "GATEWAY_VAULT__ROLE_ID and GATEWAY_VAULT__SECRET_ID (and "
                        "GATEWAY_VAULT__APPROLE_MOUNT)"
                    ) from None
                self.stats.logins += 1
                lease = float(response["auth"]["lease_duration"])
                self._gateway_expires_at = self._clock() + lease if lease else None
                log.info("vault_logged_in", extra={"method": "approle", "ttl_s": lease})
                return
            try:
                response = await self._call(self._client.auth.token.lookup_self)
            except _DENIED:
                raise ConfigError(
                    f"Vault at {settings.addr} refused the gateway's token (expired, revoked "
                    "or never valid there): check GATEWAY_VAULT__TOKEN"
                ) from None
            ttl = float(response["data"].get("ttl") or 0)
            self._gateway_expires_at = self._clock() + ttl if ttl else None

    async def _relogin(self) -> None:
        # While serving jobs, a refused login is the gateway's problem, not the job's.
        try:
            await self._authenticate(force=True)
        except ConfigError as exc:
            log.error("vault_auth_failed", extra={"error": str(exc)})
            raise SecretsUnavailable("the gateway could not log in to Vault") from None

    async def _keep_alive(self) -> None:
        """Renew the gateway's token at a third of its TTL; log in again when it is gone."""
        while True:
            await asyncio.sleep(self._renew_interval_s())
            try:
                if self._last_ok is None or self._outage_since is not None:
                    await self._authenticate(force=self._settings.role_id is not None)
                    continue
                await self._renew_self()
            except SecretsUnavailable:
                continue  # logged by _call; try again next round
            except ConfigError as exc:
                log.error("vault_auth_failed", extra={"error": str(exc)})

    def _renew_interval_s(self) -> float:
        floor = self._settings.renew_check_s
        if self._gateway_expires_at is None:
            return floor
        remaining = self._gateway_expires_at - self._clock()
        return max(0.5, min(floor, remaining / 3))

    async def _renew_self(self) -> None:
        if self._gateway_expires_at is None:
            await self._call(self._client.auth.token.lookup_self)  # a reachability probe
            return
        try:
            response = await self._call(self._client.auth.token.renew_self)
        except _DENIED:
            if self._settings.role_id is None:
                message = "vault: the gateway's token expired and cannot be renewed"
                raise ConfigError(message) from None
            await self._authenticate(force=True)
            return
        lease = float(response["auth"]["lease_duration"])
        self.stats.token_renewals += 1
        if lease < self._renew_interval_s() * 2 and self._settings.role_id is not None:
            await self._authenticate(force=True)  # at its maximum TTL: a fresh login
            return
        self._gateway_expires_at = self._clock() + lease

    # -- plumbing ------------------------------------------------------------

    def _new_client(self, token: str | None) -> hvac.Client:
        timeout = max(1, round(self._settings.timeout_s))  # hvac types it as int seconds
        return hvac.Client(url=self._settings.addr, token=token, timeout=timeout)

    async def _call(self, func: Callable[..., T], /, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._pool, lambda: func(**kwargs)),
                timeout=self._settings.timeout_s + 1.0,
            )
        except _UNAVAILABLE as exc:
            self._unavailable(exc)
        self._mark_ok()
        return result

    def _unavailable(self, exc: BaseException) -> NoReturn:
        now = self._clock()
        self.stats.failures += 1
        self._last_error = type(exc).__name__
        if self._outage_since is None:
            self._outage_since = now
            log.warning(
                "vault_unreachable",
                extra={"addr": self._settings.addr, "error": self._last_error},
            )
        down_for = now - self._outage_since
        retry_after = min(30.0, max(1.0, down_for / 2))
        raise SecretsUnavailable(retry_after_s=retry_after) from None

    def _mark_ok(self) -> None:
        if self._outage_since is not None:
            log.warning(
                "vault_recovered",
                extra={
                    "addr": self._settings.addr,
                    "down_s": round(self._clock() - self._outage_since, 1),
                },
            )
            self._outage_since = None
        self._last_ok = self._clock()


class JobSecrets:
    """One job's access to its tenant's secrets; every printable form is redacted.

    Values handed to the flow are remembered so the gateway can scrub them from the
    job's result and error text before anything is published or logged.
    """

    __slots__ = ("_handed_out", "_job_id", "_store", "_tenant")

    def __init__(self, store: SecretStore, tenant: str, job_id: str) -> None:
        self._store = store
        self._tenant = tenant
        self._job_id = job_id
        self._handed_out: set[str] = set()

    async def get(self, path: str, key: str) -> str:
        """One value of the tenant's secret `path` (relative to tenants/<tenant>/)."""
        try:
            values = await self._store.read(self._tenant, path)
        except SecretForbidden:
            audit.warning(
                "secret_forbidden",
                extra={"tenant": self._tenant, "job_id": self._job_id, "path": path[:200]},
            )
            raise
        if key not in values:
            raise SecretNotFound(f"secret {path!r} has no key {key!r}")
        value = values[key]
        if value:
            self._handed_out.add(value)
        return value

    @property
    def handed_out(self) -> frozenset[str]:
        """Values this job has received (for scrubbing; never print them)."""
        return frozenset(self._handed_out)

    def __repr__(self) -> str:
        return f"<secrets of tenant {self._tenant}: {_REDACTED}>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles to a reader that holds nothing and can read nothing.
        return (_unpickled_secrets, (self._tenant,))

    def __copy__(self) -> JobSecrets:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> JobSecrets:
        return self

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.is_instance_schema(
            cls,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda _: _REDACTED),
        )


class _UnpickledSecrets:
    def __init__(self, tenant: str) -> None:
        self._tenant = tenant

    async def get(self, path: str, key: str) -> str:
        raise JobError("secrets do not survive pickling", retryable=False, code="secrets_disabled")

    def __repr__(self) -> str:
        return f"<secrets of tenant {self._tenant}: {_REDACTED}>"


def _unpickled_secrets(tenant: str) -> _UnpickledSecrets:
    return _UnpickledSecrets(tenant)


def _escaped_forms(secret: str) -> set[str]:
    """A secret as it may appear inside other text: itself, its `repr` and its JSON
    string escapes (ASCII-only and not), without the surrounding quotes."""
    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]}
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    forms.add(secret.encode("unicode_escape").decode("ascii"))
    return {form for form in forms if form}


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """`value` with every occurrence of any of `secrets`, or of an escaped form of one,
    replaced, in strings (keys too) at any depth."""
    forms: set[str] = set()
    for secret in secrets:
        if secret:
            forms |= _escaped_forms(secret)
    needles = sorted(forms, key=len, reverse=True)
    if not needles:
        return value

    def scrub(item: Any) -> Any:
        if isinstance(item, str):
            for needle in needles:
                if needle in item:
                    item = item.replace(needle, _REDACTED)
            return item
        if isinstance(item, Mapping):
            return {scrub(k): scrub(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [scrub(v) for v in item]
        return item

    return scrub(value)
