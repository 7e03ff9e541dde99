"""Vault against a real OpenBao: bootstrap, scoped tokens, cache, outages, redaction."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
from pydantic import BaseModel, ConfigDict, SecretStr

from gateway.catalog import load_catalog
from gateway.dev.services import OpenBao, free_port
from gateway.errors import SecretForbidden, SecretNotFound, SecretsUnavailable
from gateway.settings import Settings, VaultSettings
from gateway.vault import JobSecrets, SecretStore, redact
from gateway.vault_bootstrap import bootstrap

from conftest import ROOT, VaultServer, bootstrap_vault

pytestmark = pytest.mark.integration


class FakeClock:
    """Monotonic time the test moves by hand (Vault's own TTLs still run on real time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def own_openbao(tmp_path: Path) -> Iterator[VaultServer]:
    """An OpenBao this test may stop and start (the session one stays up for the others)."""
    bao = OpenBao(free_port(), tmp_path / "openbao.log")
    bao.start()
    try:
        yield VaultServer(bao, bootstrap_vault(bao))
    finally:
        bao.stop()


def test_bootstrap_is_idempotent_and_scopes_each_tenant(openbao: VaultServer) -> None:
    settings = Settings(tenants_dir=ROOT / "tenants", policies_dir=ROOT / "policies")
    catalog = load_catalog(settings.tenants_dir, settings.policies_dir)
    again = bootstrap(
        openbao.admin(),
        catalog,
        settings=settings.vault,
        policies_dir=settings.policies_dir,
        seed_demo=True,
    )
    states = {**again.policies, **again.roles, **again.seeded}
    assert set(states.values()) == {"unchanged"}, states
    assert set(again.policies) == {
        "gateway",
        "gateway-tenant-acme",
        "gateway-tenant-globex",
        "gateway-tenant-initech",
    }
    admin = openbao.admin()
    acme = admin.read("sys/policies/acl/gateway-tenant-acme")["data"]["policy"]
    assert 'path "secret/data/tenants/acme/*"' in acme
    assert "globex" not in acme
    assert "initech" not in acme
    role = admin.read("auth/token/roles/gateway-tenant-acme")["data"]
    assert role["allowed_policies"] == ["gateway-tenant-acme"]
    assert role["orphan"] is False


def test_gateway_identity_can_mint_but_not_read(openbao: VaultServer) -> None:
    vault = openbao.gateway_vault
    assert vault.secret_id is not None
    gateway = hvac.Client(url=vault.addr, timeout=5)
    gateway.auth.approle.login(vault.role_id, vault.secret_id.get_secret_value())
    with pytest.raises(hvac.exceptions.Forbidden):
        gateway.secrets.kv.v2.read_secret_version(
            path="tenants/acme/app", raise_on_deleted_version=True
        )
    with pytest.raises(hvac.exceptions.Forbidden):  # not a role of a tenant
        gateway.auth.token.create(policies=["gateway-tenant-acme"], ttl="60s")
    minted = gateway.auth.token.create(
        role_name="gateway-tenant-acme", policies=["gateway-tenant-acme"], ttl="60s"
    )
    assert "gateway-tenant-acme" in minted["auth"]["policies"]
    assert "gateway" not in minted["auth"]["policies"]


async def test_vault_itself_refuses_another_tenants_path(openbao: VaultServer) -> None:
    store = SecretStore(openbao.gateway_vault)
    await store.start()
    try:
        assert set(await store.read("acme", "app")) == {"api_key", "password"}
        # Past the gateway's own path check: the tenant's token meets Vault's policy.
        with pytest.raises(SecretForbidden):
            await store.read_as("acme", "tenants/globex/app")
        assert store.stats.forbidden == 1
        with pytest.raises(SecretNotFound):
            await store.read("acme", "nope")
    finally:
        await store.stop()


@pytest.mark.parametrize("path", ["../globex/app", "/tenants/globex/app", "", "a//b", "a/../../x"])
async def test_job_reader_refuses_paths_outside_the_tenant_and_audits(
    openbao: VaultServer, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = SecretStore(openbao.gateway_vault)
    await store.start()
    try:
        reader = store.for_job("acme", "job-1")
        with (
            caplog.at_level(logging.WARNING, logger="gateway.audit"),
            pytest.raises(SecretForbidden),
        ):
            await reader.get(path, "api_key")
        audits = [r for r in caplog.records if r.name == "gateway.audit"]
        assert [(a.getMessage(), a.tenant, a.job_id) for a in audits] == [  # type: ignore[attr-defined]
            ("secret_forbidden", "acme", "job-1")
        ]
        assert store.stats.reads == 0
    finally:
        await store.stop()


async def test_concurrent_misses_make_one_vault_read(openbao: VaultServer) -> None:
    store = SecretStore(openbao.gateway_vault)
    await store.start()
    try:
        values = await asyncio.gather(*(store.read("initech", "db") for _ in range(25)))
        assert all(v == values[0] for v in values)
        assert (store.stats.reads, store.stats.tokens_minted) == (1, 1)
        # One lookup started the read; the other 24 joined it.
        assert (store.stats.cache_misses, store.stats.cache_coalesced) == (1, 24)
        await store.read("initech", "db")
        assert store.stats.reads == 1
        assert store.stats.cache_hits == 1
        assert store.stats.hit_ratio == 25 / 26
    finally:
        await store.stop()


async def test_outage_serves_stale_values_then_reports_unavailable(
    own_openbao: VaultServer,
) -> None:
    clock = FakeClock()
    vault = own_openbao.gateway_vault.model_copy(update={"cache_ttl_s": 10, "max_stale_s": 60})
    store = SecretStore(vault, clock=clock)
    await store.start()
    try:
        fresh = await store.read("acme", "app")
        own_openbao.bao.stop()
        clock.now += 30  # past the TTL, within max_stale
        assert await store.read("acme", "app") == fresh
        assert store.stats.stale_served == 1
        assert not store.available
        assert store.ready  # the cache still serves
        with pytest.raises(SecretsUnavailable) as never_cached:
            await store.read("globex", "app")
        assert never_cached.value.retry_after_s is not None
        assert never_cached.value.counts_attempt is False
        clock.now += 60  # past TTL + max_stale: too old to serve
        with pytest.raises(SecretsUnavailable):
            await store.read("acme", "app")
    finally:
        await store.stop()


async def test_tenant_tokens_are_renewed_then_replaced(openbao: VaultServer) -> None:
    vault = openbao.gateway_vault.model_copy(update={"tenant_token_ttl_s": 4, "cache_ttl_s": 0.1})
    store = SecretStore(vault)
    await store.start()
    try:
        await store.read("globex", "app")
        assert (store.stats.tokens_minted, store.stats.token_renewals) == (1, 0)
        await asyncio.sleep(2.3)  # past half the TTL: renewed, not replaced
        await store.read("globex", "app")
        assert (store.stats.tokens_minted, store.stats.token_renewals) == (1, 1)
        # A token revoked behind the gateway's back (or expired) is replaced on the 403.
        token = store._tokens["globex"].value
        openbao.admin().auth.token.revoke(token)
        await asyncio.sleep(0.2)
        assert await store.read("globex", "app")
        assert store.stats.tokens_minted == 2
        assert store.stats.forbidden == 0
    finally:
        await store.stop()


async def test_gateway_logs_in_again_when_its_token_is_revoked(openbao: VaultServer) -> None:
    vault = openbao.gateway_vault.model_copy(update={"cache_ttl_s": 0.1})
    store = SecretStore(vault)
    await store.start()
    try:
        await store.read("acme", "app")
        openbao.admin().auth.token.revoke(store._client.token)  # children go with it
        await asyncio.sleep(0.2)
        assert await store.read("acme", "app")
        assert store.stats.logins == 2
    finally:
        await store.stop()


async def test_gateway_token_is_renewed_before_it_expires(openbao: VaultServer) -> None:
    admin = openbao.admin()
    short = admin.auth.token.create(
        policies=["gateway"], ttl="3s", explicit_max_ttl="120s", renewable=True
    )["auth"]["client_token"]
    vault = VaultSettings(addr=openbao.bao.addr, token=SecretStr(short), renew_check_s=0.5)
    store = SecretStore(vault)
    await store.start()
    try:
        await asyncio.sleep(5)  # longer than the token's own TTL
        assert store.stats.token_renewals >= 2
        assert await store.read("acme", "app")
    finally:
        await store.stop()


class _Holder(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    secrets: JobSecrets


async def test_reader_forms_are_redacted(openbao: VaultServer) -> None:
    store = SecretStore(openbao.gateway_vault)
    await store.start()
    try:
        reader = store.for_job("acme", "job-9")
        value = await reader.get("app", "api_key")
        forms = [
            repr(reader),
            str(reader),
            f"{reader}",
            _Holder(secrets=reader).model_dump_json(),
            repr(pickle.loads(pickle.dumps(reader))),  # noqa: S301  # our own bytes
        ]
        for form in forms:
            assert value not in form
            assert "redacted" in form
        with pytest.raises(TypeError):
            json.dumps(reader)
        assert reader.handed_out == {value}
    finally:
        await store.stop()


def test_redact_masks_values_at_any_depth() -> None:
    data: Any = {"a": ["x s3cr3t y", {"s3cr3t": 1}], "b": ("s3cr3t",), "n": 3}
    assert redact(data, {"s3cr3t"}) == {
        "a": ["x [redacted] y", {"[redacted]": 1}],
        "b": ["[redacted]"],
        "n": 3,
    }
    assert redact("nothing here", {"s3cr3t"}) == "nothing here"
