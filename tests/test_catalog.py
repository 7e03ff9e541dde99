"""Catalog validation: the shipped catalog loads, every bad file is named with its field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.catalog import hash_api_key, load_catalog
from gateway.cli import main
from gateway.errors import CatalogError

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
id = "{id}"
tier = "pro"
api_keys_sha256 = ["{hash}"]
[quota]
max_concurrency = 3
[jobs]
allowed_types = ["echo"]
"""


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    tenants = tmp_path / "tenants"
    policies = tmp_path / "policies"
    tenants.mkdir()
    shutil.copytree(ROOT / "policies", policies)
    (tenants / "alpha.toml").write_text(GOOD.format(id="alpha", hash=hash_api_key("a")))
    return tenants, policies


def test_shipped_catalog_is_valid() -> None:
    catalog = load_catalog(ROOT / "tenants", ROOT / "policies")
    assert len(catalog) >= 3
    assert len({t.tier for t in catalog}) >= 3


def test_tier_is_applied_and_overridden(dirs: tuple[Path, Path]) -> None:
    catalog = load_catalog(*dirs)
    alpha = catalog.get("alpha")
    assert alpha is not None
    assert alpha.quota.max_concurrency == 3  # override
    assert alpha.quota.rate_per_s == catalog.tiers["pro"].quota.rate_per_s  # from the tier
    assert catalog.tenant_for_key_hash(hash_api_key("a")) is alpha


@pytest.mark.parametrize(
    ("name", "text", "field", "words"),
    [
        ("Bad_Id.toml", 'id = "Bad_Id"\ntier = "pro"\n', "id", "pattern"),
        ("beta.toml", 'id = "gamma"\ntier = "pro"\n', "id", "does not match the file name"),
        ("beta.toml", 'id = "beta"\ntier = "platinum"\n', "tier", "unknown tier"),
        ("beta.toml", 'id = "beta"\ntier = "pro"\n[quota]\nburst = -1\n', "quota.burst", ""),
        (
            "beta.toml",
            'id = "beta"\ntier = "pro"\n[quota]\nrate_per_s = -5\n',
            "quota.rate_per_s",
            "",
        ),
        ("beta.toml", 'id = "beta"\ntier = "pro"\ncolour = "red"\n', "colour", "unknown key"),
        (
            "beta.toml",
            'id = "beta"\ntier = "pro"\n[quota]\nspeed = 1\n',
            "quota.speed",
            "unknown key",
        ),
        (
            "beta.toml",
            'id = "beta"\ntier = "pro"\napi_keys_sha256 = ["xyz"]\n',
            "api_keys_sha256",
            "SHA-256",
        ),
        ("beta.toml", 'id = "beta"\ntier = \n', "", "malformed TOML"),
        (
            "beta.toml",
            'id = "beta"\ntier = "pro"\n[secrets]\npaths = ["../x"]\n',
            "secrets.paths",
            "",
        ),
    ],
)
def test_bad_tenant_file_is_named(
    dirs: tuple[Path, Path], name: str, text: str, field: str, words: str
) -> None:
    tenants, policies = dirs
    (tenants / name).write_text(text)
    with pytest.raises(CatalogError) as caught:
        load_catalog(tenants, policies)
    assert caught.value.path.endswith(name)
    assert caught.value.field == field
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'id = "beta"\ntier = "pro"\nnote = "caf\xe9"\n', "not UTF-8 (byte 36)"),
        (b'id = "beta"\nid = "beta"\ntier = "pro"\n', "duplicate key"),
    ],
)
def test_unreadable_tenant_file_is_named(dirs: tuple[Path, Path], data: bytes, words: str) -> None:
    tenants, policies = dirs
    (tenants / "beta.toml").write_bytes(data)
    with pytest.raises(CatalogError) as caught:
        load_catalog(tenants, policies)
    assert caught.value.path.endswith("beta.toml")
    assert words in str(caught.value)


def test_duplicate_key_hash_across_tenants(dirs: tuple[Path, Path]) -> None:
    tenants, policies = dirs
    (tenants / "beta.toml").write_text(GOOD.format(id="beta", hash=hash_api_key("a")))
    with pytest.raises(CatalogError, match=r"also used by alpha\.toml") as caught:
        load_catalog(tenants, policies)
    assert caught.value.field == "api_keys_sha256"


def test_duplicate_key_hash_within_a_tenant(dirs: tuple[Path, Path]) -> None:
    tenants, policies = dirs
    digest = hash_api_key("b")
    (tenants / "beta.toml").write_text(
        f'id = "beta"\ntier = "pro"\napi_keys_sha256 = ["{digest}", "{digest}"]\n'
    )
    with pytest.raises(CatalogError, match="duplicate"):
        load_catalog(tenants, policies)


def test_bad_tier_file(dirs: tuple[Path, Path]) -> None:
    tenants, policies = dirs
    (policies / "quotas.toml").write_text("[pro]\nmax_concurrency = 0\n")
    with pytest.raises(CatalogError) as caught:
        load_catalog(tenants, policies)
    assert caught.value.path.endswith("quotas.toml")
    assert caught.value.field.startswith("pro.")


def _check(tenants: Path, policies: Path) -> tuple[int, str]:
    env = {"GATEWAY_TENANTS_DIR": str(tenants), "GATEWAY_POLICIES_DIR": str(policies)}
    result = CliRunner().invoke(main, ["tenants", "check"], env=env)
    return result.exit_code, result.output


def test_cli_check_passes_on_shipped_catalog() -> None:
    code, output = _check(ROOT / "tenants", ROOT / "policies")
    assert code == 0, output
    for tenant in ("acme", "globex", "initech"):
        assert tenant in output
    assert "ok: 3 tenants" in output


def test_cli_check_fails_with_file_and_field(dirs: tuple[Path, Path]) -> None:
    tenants, policies = dirs
    (tenants / "beta.toml").write_text('id = "beta"\ntier = "pro"\n[quota]\nweight = -2\n')
    code, output = _check(tenants, policies)
    assert code == 1
    assert "beta.toml: quota.weight" in output


def test_cli_check_rejects_unknown_job_types(dirs: tuple[Path, Path]) -> None:
    tenants, policies = dirs
    (tenants / "beta.toml").write_text(
        'id = "beta"\ntier = "pro"\n[jobs]\nallowed_types = ["nope"]\n'
    )
    code, output = _check(tenants, policies)
    assert code == 1
    assert "beta.toml: jobs.allowed_types" in output
