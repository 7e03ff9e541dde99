"""Tenant catalog: `tenants/<id>.toml` on top of the tiers in `policies/quotas.toml`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rtoml  # Rust; parses a tenant file five times faster than tomli, twenty than tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import CatalogError

__all__ = [
    "DEFAULT_MAX_DEADLINE_S",
    "MAX_ATTEMPTS_LIMIT",
    "TENANT_ID_PATTERN",
    "Catalog",
    "CatalogLoader",
    "JobPolicy",
    "Quota",
    "Tenant",
    "Tier",
    "hash_api_key",
    "load_catalog",
]

TENANT_ID_PATTERN = r"^[a-z0-9-]{1,63}$"
_SHA256_HEX = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# The contract's bounds on what a job may ask for (jobs topic and POST /v1/jobs).
MAX_ATTEMPTS_LIMIT = 100
DEFAULT_MAX_DEADLINE_S = 3600.0


class _QuotaFields(_Strict):
    max_concurrency: int = Field(ge=1)
    rate_per_s: float = Field(gt=0)
    burst: int = Field(ge=1)
    max_queued: int = Field(ge=0)
    weight: int = Field(ge=1)
    # POST /v1/jobs per tenant; unset: derived from rate_per_s and burst.
    submit_rate_per_s: float | None = Field(default=None, gt=0)
    submit_burst: int | None = Field(default=None, ge=1)


class _TierFields(_QuotaFields):
    # Job limits a tier gives its tenants unless their file says otherwise.
    max_deadline_s: float = Field(default=DEFAULT_MAX_DEADLINE_S, gt=0)


class _QuotaOverrides(_Strict):
    max_concurrency: int | None = Field(default=None, ge=1)
    rate_per_s: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    max_queued: int | None = Field(default=None, ge=0)
    weight: int | None = Field(default=None, ge=1)
    submit_rate_per_s: float | None = Field(default=None, gt=0)
    submit_burst: int | None = Field(default=None, ge=1)


class _JobsSection(_Strict):
    allowed_types: list[str] = Field(default_factory=lambda: ["echo"])
    default_deadline_s: float = Field(default=60.0, gt=0)
    max_deadline_s: float | None = Field(default=None, gt=0)
    max_attempts: int | None = Field(default=None, ge=1, le=MAX_ATTEMPTS_LIMIT)


class _SecretsSection(_Strict):
    paths: list[str] = Field(default_factory=list)

    @field_validator("paths")
    @classmethod
    def _relative_paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            parts = path.split("/")
            if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"secret path {path!r} must be a relative path without '..'")
        return paths


class _TenantFile(_Strict):
    id: str = Field(pattern=TENANT_ID_PATTERN)
    tier: str
    api_keys_sha256: list[str] = Field(default_factory=list)
    # Factories, not instances: pydantic would deep-copy an instance default per file.
    quota: _QuotaOverrides = Field(default_factory=_QuotaOverrides)
    jobs: _JobsSection = Field(default_factory=_JobsSection)
    secrets: _SecretsSection = Field(default_factory=_SecretsSection)

    @field_validator("api_keys_sha256")
    @classmethod
    def _hex_hashes(cls, hashes: list[str]) -> list[str]:
        for value in hashes:
            if not re.fullmatch(_SHA256_HEX, value):
                raise ValueError("each entry must be 64 lowercase hex characters (SHA-256)")
        if len(set(hashes)) != len(hashes):
            raise ValueError("duplicate API key hash")
        return hashes


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's effective limits."""

    max_concurrency: int
    rate_per_s: float
    burst: int
    max_queued: int
    weight: int
    # Submissions through POST /v1/jobs (a token bucket per tenant; over it: 429).
    submit_rate_per_s: float
    submit_burst: int


def _with_submit_defaults(fields: dict[str, Any]) -> dict[str, Any]:
    """Fill the submission limits a tier or tenant left unset: four times the start rate
    and burst (at least 50/s and 100), so the API can queue a backlog faster than it
    runs, but no tenant can flood the broker through it."""
    rate, burst = fields["rate_per_s"], fields["burst"]
    if fields.get("submit_rate_per_s") is None:
        fields["submit_rate_per_s"] = max(50.0, 4 * rate)
    if fields.get("submit_burst") is None:
        fields["submit_burst"] = max(100, 4 * burst)
    return fields


@dataclass(frozen=True, slots=True)
class JobPolicy:
    """What a tenant may run and for how long."""

    allowed_types: frozenset[str]
    default_deadline_s: float
    max_deadline_s: float
    max_attempts: int | None


@dataclass(frozen=True, slots=True)
class Tier:
    """A preset from policies/quotas.toml: a quota and the job limits that go with it."""

    quota: Quota
    max_deadline_s: float
    # What a tenant's quota starts from: the tier's quota, but with the submission limits
    # as the tier file gives them (None: derived from the tenant's own rate).
    tenant_defaults: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Tenant:
    """One validated tenant with its tier already applied."""

    id: str
    tier: str
    api_keys_sha256: frozenset[str]
    quota: Quota
    jobs: JobPolicy
    secret_paths: tuple[str, ...]
    source: str  # the tenant's file


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every tenant, by id, plus the tiers they were built from."""

    tenants: Mapping[str, Tenant]
    tiers: Mapping[str, Tier]

    def get(self, tenant_id: str) -> Tenant | None:
        """The tenant, or None when unknown."""
        return self.tenants.get(tenant_id)

    def __iter__(self) -> Iterator[Tenant]:
        return iter(sorted(self.tenants.values(), key=lambda t: t.id))

    def __len__(self) -> int:
        return len(self.tenants)

    def tenant_for_key_hash(self, key_hash: str) -> Tenant | None:
        """The tenant owning an API key hash (callers compare in constant time)."""
        for tenant in self.tenants.values():
            if key_hash in tenant.api_keys_sha256:
                return tenant
        return None


def hash_api_key(key: str) -> str:
    """SHA-256 hex of an API key, as stored in tenant files."""
    return hashlib.sha256(key.encode()).hexdigest()


def _read(path: str) -> tuple[str, tuple[int, int]]:
    """A file's text and its stamp (modification time, size) from one open: the stamp is
    the file's as read, however it changes meanwhile. Plain `os` calls: a tenant file is
    a few hundred bytes, so a file object and its buffer cost more than reading it."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            stat = os.fstat(handle)
            chunks = []
            while chunk := os.read(handle, stat.st_size + 4096):
                chunks.append(chunk)
        finally:
            os.close(handle)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return data.decode(), (stat.st_mtime_ns, stat.st_size)
    except UnicodeDecodeError as exc:
        raise CatalogError(path, "", f"not UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise CatalogError(path, "", f"cannot read: {exc.strerror}") from None


def _parse(path: str, text: str) -> dict[str, Any]:
    try:
        return rtoml.loads(text)
    except ValueError as exc:  # rtoml.TomlParsingError, and any value it cannot convert
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CatalogError(path, "", f"malformed TOML: {first}") from None


def _raise_first(path: str, exc: ValidationError, prefix: str = "") -> CatalogError:
    error = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in error["loc"])
    if prefix:
        field = f"{prefix}.{field}" if field else prefix
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return CatalogError(path, field, message)


def _load_tiers(policies_dir: Path) -> dict[str, Tier]:
    path = str(policies_dir / "quotas.toml")
    raw = _parse(path, _read(path)[0])
    tiers: dict[str, Tier] = {}
    for name, fields in raw.items():
        if not isinstance(fields, dict):
            raise CatalogError(path, name, "each tier must be a table")
        try:
            parsed = _TierFields.model_validate(fields)
        except ValidationError as exc:
            raise _raise_first(path, exc, prefix=name) from None
        fields = parsed.model_dump(exclude={"max_deadline_s"})
        tenant_defaults = dict(fields)
        quota = Quota(**_with_submit_defaults(fields))
        tiers[name] = Tier(
            quota=quota, max_deadline_s=parsed.max_deadline_s, tenant_defaults=tenant_defaults
        )
    if not tiers:
        raise CatalogError(path, "", "no tiers defined")
    return tiers


def _build_tenant(path: str, name: str, raw: dict[str, Any], tiers: Mapping[str, Tier]) -> Tenant:
    """The tenant of file `name` (at `path`), validated, on its tier."""
    try:
        parsed = _TenantFile.model_validate(raw)
    except ValidationError as exc:
        raise _raise_first(path, exc) from None
    if name != f"{parsed.id}.toml":
        raise CatalogError(path, "id", f"{parsed.id!r} does not match the file name")
    tier = tiers.get(parsed.tier)
    if tier is None:
        known = ", ".join(sorted(tiers))
        raise CatalogError(path, "tier", f"unknown tier {parsed.tier!r} (known: {known})")
    # Submission limits the tier leaves unset are derived from the tenant's own rate.
    merged = {**tier.tenant_defaults, **parsed.quota.model_dump(exclude_none=True)}
    quota = Quota(**_with_submit_defaults(merged))
    if quota.burst < 1:
        raise CatalogError(path, "quota.burst", "must be at least 1")
    jobs = parsed.jobs
    max_deadline_s = jobs.max_deadline_s or tier.max_deadline_s
    if jobs.default_deadline_s > max_deadline_s:
        raise CatalogError(
            path,
            "jobs.default_deadline_s",
            f"{jobs.default_deadline_s:g} is above max_deadline_s ({max_deadline_s:g})",
        )
    return Tenant(
        id=parsed.id,
        tier=parsed.tier,
        api_keys_sha256=frozenset(parsed.api_keys_sha256),
        quota=quota,
        jobs=JobPolicy(
            allowed_types=frozenset(jobs.allowed_types),
            default_deadline_s=jobs.default_deadline_s,
            max_deadline_s=max_deadline_s,
            max_attempts=jobs.max_attempts,
        ),
        secret_paths=tuple(parsed.secrets.paths),
        source=path,
    )


def load_catalog(tenants_dir: Path, policies_dir: Path) -> Catalog:
    """Load and validate the whole catalog; raise CatalogError naming file and field."""
    return CatalogLoader(tenants_dir, policies_dir).load()


class CatalogLoader:
    """Loads the catalog again and again, re-reading only the files that changed.

    Tenant files are cached by name with the modification time and size they had when
    read; a load stats every cached file and reads only new or changed ones (all of them
    when the tiers changed). A new file is opened, statted and read at once (`_read`). A
    file costs well under 100 µs of one core to read, parse (rtoml), validate and build;
    a reload after one file changed costs a stat per file.
    """

    def __init__(self, tenants_dir: Path, policies_dir: Path) -> None:
        self._tenants_dir = tenants_dir
        self._policies_dir = policies_dir
        self._tiers_stamp: tuple[int, int] | None = None
        self._tiers: dict[str, Tier] = {}
        self._parsed: dict[str, tuple[tuple[int, int], Tenant]] = {}

    def stamps(self) -> tuple[tuple[str, int, int], ...]:
        """Name, modification time and size of every catalog file (changes are cheap to
        detect: a stat each)."""
        found = []
        with contextlib.suppress(OSError):
            stat = (self._policies_dir / "quotas.toml").stat()
            found.append(("quotas.toml", stat.st_mtime_ns, stat.st_size))
        with contextlib.suppress(OSError), os.scandir(self._tenants_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".toml") and entry.is_file():
                    stat = entry.stat()
                    found.append((entry.name, stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(found))

    def load(self) -> Catalog:
        """The catalog as the files are now; raise CatalogError naming file and field."""
        tiers_path = self._policies_dir / "quotas.toml"
        try:
            tiers_stat = tiers_path.stat()
        except OSError as exc:
            raise CatalogError(str(tiers_path), "", f"cannot read: {exc.strerror}") from None
        tiers_stamp = (tiers_stat.st_mtime_ns, tiers_stat.st_size)
        if tiers_stamp != self._tiers_stamp:
            self._tiers = _load_tiers(self._policies_dir)
            self._tiers_stamp = tiers_stamp
            self._parsed.clear()  # every tenant is built on its tier
        if not self._tenants_dir.is_dir():
            raise CatalogError(str(self._tenants_dir), "", "tenants directory does not exist")
        tenants: dict[str, Tenant] = {}
        key_owner: dict[str, str] = {}
        parsed: dict[str, tuple[tuple[int, int], Tenant]] = {}
        with os.scandir(self._tenants_dir) as scan:
            entries = sorted((e for e in scan if e.name.endswith(".toml")), key=lambda e: e.name)
        for entry in entries:
            if not entry.is_file():
                continue
            name = entry.name
            cached = self._parsed.get(name)
            if cached is not None:
                stat = entry.stat()
                if cached[0] != (stat.st_mtime_ns, stat.st_size):
                    cached = None
            if cached is None:
                text, stamp = _read(entry.path)
                tenant = _build_tenant(entry.path, name, _parse(entry.path, text), self._tiers)
                cached = (stamp, tenant)
            parsed[name] = cached
            tenant = cached[1]
            for key_hash in tenant.api_keys_sha256:
                other = key_owner.get(key_hash)
                if other is not None:
                    raise CatalogError(
                        entry.path, "api_keys_sha256", f"API key hash also used by {other}"
                    )
                key_owner[key_hash] = name
            tenants[tenant.id] = tenant
        self._parsed = parsed
        return Catalog(tenants=tenants, tiers=self._tiers)
