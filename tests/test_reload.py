"""Catalog hot reload on a running gateway: changes apply, bad catalogs are refused."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.catalog import load_catalog
from gateway.service import Gateway
from gateway.settings import Settings

from conftest import ROOT, JobClient, read_topic, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def live(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Gateway, Path]]:
    tenants = tmp_path / "tenants"
    shutil.copytree(ROOT / "tenants", tenants)
    configured = settings.model_copy(update={"tenants_dir": tenants, "catalog_poll_s": 0.1})
    gateway = Gateway(configured, load_catalog(tenants, configured.policies_dir))
    await gateway.start()
    try:
        yield gateway, tenants
    finally:
        await gateway.stop()


async def test_rate_change_applies_without_restart(live: tuple[Gateway, Path]) -> None:
    gateway, tenants = live
    path = tenants / "globex.toml"
    path.write_text(path.read_text() + "\n[quota]\nrate_per_s = 3.5\nburst = 7\n")
    await wait_for(lambda: gateway.catalog().get("globex").quota.rate_per_s == 3.5, 10)  # type: ignore[union-attr]
    queue = gateway.pools.scheduler.tenant("globex")
    assert queue is not None
    assert queue.bucket.rate == 3.5


async def test_invalid_catalog_keeps_the_last_good_one(live: tuple[Gateway, Path]) -> None:
    gateway, tenants = live
    before = gateway.catalog()
    (tenants / "broken.toml").write_text('id = "broken"\ntier = "gold"\n')
    await asyncio.sleep(0.5)  # several polls see the broken file and refuse it
    assert gateway.catalog() is before
    assert gateway.reloader.reload() is False
    assert gateway.catalog() is before
    assert gateway.catalog().get("acme") is not None


async def test_removed_tenant_new_jobs_go_to_dlq(
    live: tuple[Gateway, Path], client: JobClient
) -> None:
    gateway, tenants = live
    (tenants / "globex.toml").unlink()
    await wait_for(lambda: gateway.catalog().get("globex") is None, 10)
    await client.job("globex", "gone-1", "echo")
    await client.job("acme", "kept-1", "echo")
    await client.flush()
    dlq = await read_topic(client.settings, client.settings.topics.dlq, until=1, timeout_s=30)
    assert dict(dlq[0].headers)["dlq-reason"] == b"unknown_tenant"
    results = await read_topic(
        client.settings, client.settings.topics.results, until=1, timeout_s=30
    )
    assert json.loads(results[0].value)["id"] == "kept-1"
