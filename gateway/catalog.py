"""Tenant catalog: `tenants/<id>.toml` on top of the tiers in `policies/quotas.toml`."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import CatalogError

__all__ = [
    "TENANT_ID_PATTERN",
    "Catalog",
    "JobPolicy",
    "Quota",
    "Tenant",
    "hash_api_key",
    "load_catalog",
]

TENANT_ID_PATTERN = r"^[a-z0-9-]{1,63}$"
_SHA256_HEX = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class _QuotaFields(_Strict):
    max_concurrency: int = Field(ge=1)
    rate_per_s: float = Field(gt=0)
    burst: int = Field(ge=1)
    max_queued: int = Field(ge=0)
    weight: int = Field(ge=1)


class _QuotaOverrides(_Strict):
    max_concurrency: int | None = Field(default=None, ge=1)
    rate_per_s: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    max_queued: int | None = Field(default=None, ge=0)
    weight: int | None = Field(default=None, ge=1)


class _JobsSection(_Strict):
    allowed_types: list[str] = Field(default_factory=lambda: ["echo"])
    default_deadline_s: float = Field(default=60.0, gt=0)
    max_attempts: int | None = Field(default=None, ge=1)


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
    quota: _QuotaOverrides = _QuotaOverrides()
    jobs: _JobsSection = _JobsSection()
    secrets: _SecretsSection = _SecretsSection()

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


@dataclass(frozen=True, slots=True)
class JobPolicy:
    """What a tenant may run and for how long."""

    allowed_types: frozenset[str]
    default_deadline_s: float
    max_attempts: int | None


@dataclass(frozen=True, slots=True)
class Tenant:
    """One validated tenant with its tier already applied."""

    id: str
    tier: str
    api_keys_sha256: frozenset[str]
    quota: Quota
    jobs: JobPolicy
    secret_paths: tuple[str, ...]
    source: Path


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every tenant, by id, plus the tiers they were built from."""

    tenants: Mapping[str, Tenant]
    tiers: Mapping[str, Quota]

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


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(str(path), "", f"malformed TOML: {exc}") from None
    except OSError as exc:
        raise CatalogError(str(path), "", f"cannot read: {exc.strerror}") from None


def _raise_first(path: Path, exc: ValidationError, prefix: str = "") -> CatalogError:
    error = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in error["loc"])
    if prefix:
        field = f"{prefix}.{field}" if field else prefix
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return CatalogError(str(path), field, message)


def _load_tiers(policies_dir: Path) -> dict[str, Quota]:
    path = policies_dir / "quotas.toml"
    raw = _read_toml(path)
    tiers: dict[str, Quota] = {}
    for name, fields in raw.items():
        if not isinstance(fields, dict):
            raise CatalogError(str(path), name, "each tier must be a table")
        try:
            parsed = _QuotaFields.model_validate(fields)
        except ValidationError as exc:
            raise _raise_first(path, exc, prefix=name) from None
        tiers[name] = Quota(**parsed.model_dump())
    if not tiers:
        raise CatalogError(str(path), "", "no tiers defined")
    return tiers


def _build_tenant(path: Path, raw: dict[str, Any], tiers: Mapping[str, Quota]) -> Tenant:
    try:
        parsed = _TenantFile.model_validate(raw)
    except ValidationError as exc:
        raise _raise_first(path, exc) from None
    if parsed.id != path.stem:
        raise CatalogError(str(path), "id", f"{parsed.id!r} does not match the file name")
    base = tiers.get(parsed.tier)
    if base is None:
        known = ", ".join(sorted(tiers))
        raise CatalogError(str(path), "tier", f"unknown tier {parsed.tier!r} (known: {known})")
    overrides = {k: v for k, v in parsed.quota.model_dump().items() if v is not None}
    quota = Quota(**{**_as_dict(base), **overrides})
    if quota.burst < 1:
        raise CatalogError(str(path), "quota.burst", "must be at least 1")
    return Tenant(
        id=parsed.id,
        tier=parsed.tier,
        api_keys_sha256=frozenset(parsed.api_keys_sha256),
        quota=quota,
        jobs=JobPolicy(
            allowed_types=frozenset(parsed.jobs.allowed_types),
            default_deadline_s=parsed.jobs.default_deadline_s,
            max_attempts=parsed.jobs.max_attempts,
        ),
        secret_paths=tuple(parsed.secrets.paths),
        source=path,
    )


def _as_dict(quota: Quota) -> dict[str, Any]:
    return {name: getattr(quota, name) for name in Quota.__slots__}


def load_catalog(tenants_dir: Path, policies_dir: Path) -> Catalog:
    """Load and validate the whole catalog; raise CatalogError naming file and field."""
    tiers = _load_tiers(policies_dir)
    if not tenants_dir.is_dir():
        raise CatalogError(str(tenants_dir), "", "tenants directory does not exist")
    tenants: dict[str, Tenant] = {}
    key_owner: dict[str, Path] = {}
    for path in sorted(tenants_dir.glob("*.toml")):
        tenant = _build_tenant(path, _read_toml(path), tiers)
        for key_hash in tenant.api_keys_sha256:
            other = key_owner.get(key_hash)
            if other is not None:
                raise CatalogError(
                    str(path), "api_keys_sha256", f"API key hash also used by {other.name}"
                )
            key_owner[key_hash] = path
        tenants[tenant.id] = tenant
    return Catalog(tenants=tenants, tiers=tiers)
