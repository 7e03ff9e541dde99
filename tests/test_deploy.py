"""Deployment files: they parse, name only real settings, probe real endpoints."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.settings import Settings

from conftest import ROOT

DEPLOY = ROOT / "deploy"


def _setting_exists(name: str) -> bool:
    """Whether GATEWAY_A__B names a real (nested) field: unknown names are ignored silently."""
    model: Any = Settings
    for part in name.removeprefix("GATEWAY_").lower().split("__"):
        fields = model.model_fields
        if part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
        if model is not None and not issubclass(model, BaseModel):
            model = None
    return True


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _deployment() -> dict[str, Any]:
    (deployment,) = [d for d in _k8s_docs() if d.get("kind") == "Deployment"]
    return deployment


def _env_names() -> dict[str, str]:
    names: dict[str, str] = {}
    container = _deployment()["spec"]["template"]["spec"]["containers"][0]
    for item in container["env"]:
        names[item["name"]] = str(item.get("value", ""))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service in compose["services"].values():
        names.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    for match in re.finditer(r"(GATEWAY_[A-Z_]+)=(\S+)", (DEPLOY / "Dockerfile").read_text()):
        names[match.group(1)] = match.group(2)
    return {k: v for k, v in names.items() if k.startswith("GATEWAY_")}


def test_every_gateway_variable_is_a_real_setting() -> None:
    names = _env_names()
    assert len(names) >= 10
    unknown = sorted(name for name in names if not _setting_exists(name))
    assert unknown == []


def test_the_deployments_values_parse_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _env_names().items():
        if value and "$" not in value and not value.startswith("valueFrom"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_VAULT__ROLE_ID", "role")
    monkeypatch.setenv("GATEWAY_VAULT__SECRET_ID", "secret")
    settings = Settings()
    assert settings.http.host == "0.0.0.0"  # noqa: S104  # inside a container


def test_probes_and_grace_period_fit_the_service() -> None:
    spec = _deployment()["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {item["name"]: item.get("value") for item in container["env"]}
    grace = float(env["GATEWAY_SHUTDOWN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] > grace
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    stop = compose["services"]["gateway-1"]["stop_grace_period"]
    assert float(stop.rstrip("s")) > grace


def test_image_installs_only_the_lean_lock() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "--no-deps -r requirements/runtime.txt" in dockerfile
    assert "--no-deps ." in dockerfile
    assert "USER gateway" in dockerfile


def test_kustomization_references_existing_files() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    base = DEPLOY / "k8s"
    for resource in kustomization["resources"]:
        assert (base / resource).is_file(), resource
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            key, _, source = entry.partition("=")
            assert re.fullmatch(r"[-._a-zA-Z0-9]+", key), key
            assert (base / source).resolve().is_file(), source
    shipped = {p.name for p in (ROOT / "tenants").glob("*.toml")}
    catalog = next(g for g in kustomization["configMapGenerator"] if g["name"] == "gateway-catalog")
    assert {e.partition("=")[0] for e in catalog["files"]} == shipped


def test_unknown_names_are_detected() -> None:
    assert _setting_exists("GATEWAY_KAFKA__GROUP_ID")
    assert not _setting_exists("GATEWAY_KAFKA__GROUPID")
    assert not _setting_exists("GATEWAY_NOPE")
