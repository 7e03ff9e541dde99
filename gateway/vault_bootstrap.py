"""`gateway vault bootstrap`: per-tenant policies and token roles, from the catalog.

Applied with an administrator's token. Every step is idempotent: policies and roles are
written only when they differ, secrets are seeded only where none exist, and running it
again after a catalog change adds what the new tenants need.
"""

from __future__ import annotations

import logging
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions

from gateway.catalog import Catalog
from gateway.errors import ConfigError
from gateway.settings import VaultSettings
from gateway.vault import tenant_policy_name, tenant_role_name

__all__ = [
    "GATEWAY_POLICY",
    "GATEWAY_ROLE",
    "BootstrapReport",
    "bootstrap",
    "render_tenant_policy",
]

log = logging.getLogger("gateway.vault")

GATEWAY_POLICY = "gateway"
GATEWAY_ROLE = "gateway"
# Tenant tokens live tenant_token_ttl_s and are renewed at half; this caps renewals.
_TENANT_MAX_LIFETIME_S = 24 * 3600
_GATEWAY_LIFETIME_S = 3600  # AppRole login; renewed by the gateway up to the maximum
_GATEWAY_MAX_LIFETIME_S = 24 * 3600
_DEMO_KEYS = ("api_key", "password")


@dataclass(frozen=True, slots=True)
class AppRoleCredentials:
    """What `gateway run` needs to log in as the gateway (secret_id shown once)."""

    role_id: str
    secret_id: str = field(repr=False)


@dataclass(slots=True)
class BootstrapReport:
    """What bootstrap found and did, item by item: created, updated or unchanged."""

    policies: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    seeded: dict[str, str] = field(default_factory=dict)
    approle: AppRoleCredentials | None = None

    def lines(self) -> list[str]:
        """One human-readable line per item (no secret values)."""
        out = [f"policy {name}: {state}" for name, state in sorted(self.policies.items())]
        out += [f"token role {name}: {state}" for name, state in sorted(self.roles.items())]
        out += [f"secret {path}: {state}" for path, state in sorted(self.seeded.items())]
        return out


def render_tenant_policy(template: str, tenant: str, mount: str) -> str:
    """The template with `${tenant}` and `${mount}` filled in; other `$` are errors."""
    try:
        return string.Template(template).substitute(tenant=tenant, mount=mount)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"policies/vault/tenant.hcl: bad placeholder ({exc})") from None


def bootstrap(
    client: hvac.Client,
    catalog: Catalog,
    *,
    settings: VaultSettings,
    policies_dir: Path,
    seed_demo: bool = False,
    approle: bool = False,
) -> BootstrapReport:
    """Apply everything the catalog needs in Vault (idempotent)."""
    template = _read(policies_dir / "vault" / "tenant.hcl")
    gateway_hcl = _read(policies_dir / "vault" / "gateway.hcl")
    report = BootstrapReport()
    _ensure_kv2(client, settings.mount)
    # Secrets first, roles last: once a tenant's token can be minted, its secrets exist.
    if seed_demo:
        for tenant in catalog:
            for path in tenant.secret_paths:
                full = f"tenants/{tenant.id}/{path}"
                report.seeded[full] = _seed(client, settings.mount, full)
    for tenant in catalog:
        name = tenant_policy_name(tenant.id)
        policy = render_tenant_policy(template, tenant.id, settings.mount)
        report.policies[name] = _put_policy(client, name, policy)
    report.policies[GATEWAY_POLICY] = _put_policy(client, GATEWAY_POLICY, gateway_hcl)
    for tenant in catalog:
        role = tenant_role_name(tenant.id)
        report.roles[role] = _put_token_role(client, role, tenant_policy_name(tenant.id))
    if approle:
        report.approle = _gateway_approle(client, settings.approle_mount)
    return report


def _data(response: Any) -> dict[str, Any]:
    # hvac returns the JSON body (a dict) or None for 204/404 answers.
    if not isinstance(response, dict):
        return {}
    data = response.get("data", response)
    return data if isinstance(data, dict) else {}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read Vault policy template ({exc.strerror})") from None


def _ensure_kv2(client: hvac.Client, mount: str) -> None:
    mounts = _data(client.read("sys/mounts"))
    existing = mounts.get(f"{mount}/")
    if existing is None:
        client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
        log.info("vault_mount_enabled", extra={"mount": mount})
        return
    version = str((existing.get("options") or {}).get("version", "1"))
    if existing.get("type") != "kv" or version != "2":
        raise ConfigError(f"vault: mount {mount!r} exists but is not KV version 2")


def _put_policy(client: hvac.Client, name: str, policy: str) -> str:
    try:
        text = _data(client.read(f"sys/policies/acl/{name}")).get("policy")
    except hvac.exceptions.InvalidPath:
        text = None
    if text == policy:
        return "unchanged"
    client.sys.create_or_update_acl_policy(name, policy)
    return "created" if text is None else "updated"


def _put_token_role(client: hvac.Client, role: str, policy: str) -> str:
    wanted: dict[str, Any] = {
        "allowed_policies": [policy],
        "orphan": False,
        "renewable": True,
        "token_explicit_max_ttl": _TENANT_MAX_LIFETIME_S,
        "token_type": "service",
    }
    try:
        current = client.read(f"auth/token/roles/{role}")
    except hvac.exceptions.InvalidPath:
        current = None
    data = current.get("data") if isinstance(current, dict) else None
    if data is not None and _role_matches(data, policy):
        return "unchanged"
    client.write_data(f"auth/token/roles/{role}", data=wanted)
    return "created" if data is None else "updated"


def _role_matches(data: dict[str, Any], policy: str) -> bool:
    return (
        list(data.get("allowed_policies") or []) == [policy]
        and not data.get("orphan")
        and bool(data.get("renewable"))
        and int(data.get("token_explicit_max_ttl") or 0) == _TENANT_MAX_LIFETIME_S
    )


def _seed(client: hvac.Client, mount: str, full: str) -> str:
    try:
        client.secrets.kv.v2.read_secret_version(
            path=full, mount_point=mount, raise_on_deleted_version=True
        )
    except hvac.exceptions.InvalidPath:
        values = {key: secrets.token_urlsafe(24) for key in _DEMO_KEYS}
        client.secrets.kv.v2.create_or_update_secret(path=full, secret=values, mount_point=mount)
        return "created"
    return "unchanged"


def _gateway_approle(client: hvac.Client, mount: str) -> AppRoleCredentials:
    methods = _data(client.read("sys/auth"))
    if f"{mount}/" not in methods:
        client.sys.enable_auth_method("approle", path=mount)
    client.auth.approle.create_or_update_approle(
        GATEWAY_ROLE,
        token_policies=[GATEWAY_POLICY],
        token_ttl=_GATEWAY_LIFETIME_S,
        token_max_ttl=_GATEWAY_MAX_LIFETIME_S,
        mount_point=mount,
    )
    role_id = client.auth.approle.read_role_id(GATEWAY_ROLE, mount_point=mount)["data"]["role_id"]
    secret = client.auth.approle.generate_secret_id(GATEWAY_ROLE, mount_point=mount)
    return AppRoleCredentials(role_id=role_id, secret_id=secret["data"]["secret_id"])
