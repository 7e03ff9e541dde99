"""The production kit in deploy/, validated offline.

- Kubernetes: every kustomization lists exactly its files; `kubectl kustomize` renders the
  base and the example overlay (skipped without kubectl); every core manifest, as written
  and as rendered, validates against the Kubernetes API schemas that kubernetes-validate
  ships (no cluster, no network); the custom resources (KEDA ScaledObject, Prometheus
  operator ServiceMonitor and PrometheusRule) against checks written from their CRDs;
  names, ports, probes, grace period, hardening and secrets against the gateway itself.
- Settings: every GATEWAY_* variable in a manifest, compose or the Dockerfile is a real
  setting, and the values parse.
- Alerts: `promtool check rules` and `promtool test rules` (skipped without promtool);
  the PrometheusRule and the other copies equal their sources (deploy/sync.py); every
  runbook_url points at a section of deploy/RUNBOOK.md.
- Metrics: every metric the alerts and the dashboard use is a gateway_ metric (or a
  standard one), and a real `gateway run` exports it (integration).
- The two one-shot scripts of deploy/scripts on a real broker and a real OpenBao.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import hvac
import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import BaseModel

from gateway.api.openapi import ops_document
from gateway.catalog import load_catalog
from gateway.dev.services import Tansu
from gateway.settings import KafkaSettings, Settings

from conftest import ROOT, JobClient, VaultServer, make_settings, wait_for

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "gateway.json"
RUNBOOK = DEPLOY / "RUNBOOK.md"
SCRIPTS = DEPLOY / "scripts"

# Kubernetes versions the core manifests must be valid for: the oldest we support and
# the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
# Secrets the operator (or the vault bootstrap Job) creates; never in the manifests.
EXTERNAL_SECRETS = {"gateway-vault", "gateway-ops", "gateway-vault-admin"}

# Names a PromQL expression of ours may use besides gateway_*.
STANDARD_METRICS = frozenset({"up"})


def _load(module: str, path: Path) -> Any:
    """A script under deploy/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(module, path)
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded


sync = _load("deploy_sync", DEPLOY / "sync.py")
create_topics = _load("create_topics", SCRIPTS / "create_topics.py")
vault_job = _load("vault_bootstrap_job", SCRIPTS / "vault_bootstrap_job.py")


# --- reading the manifests ------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def _kustomization(directory: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return loaded


def _source_docs() -> list[dict[str, Any]]:
    """Every resource file any kustomization lists, as written (not rendered)."""
    docs = []
    for directory in _kustomizations():
        for resource in _kustomization(directory).get("resources", []):
            path = directory / resource
            if path.is_file():
                docs.extend(_docs(path))
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return found


def _deployment() -> dict[str, Any]:
    return _one(_docs(BASE / "deployment.yaml"), "Deployment")


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _k8s_settings_env() -> dict[str, str]:
    """gateway-env as the example overlay builds it: the base's file, the overlay's merge."""
    env = _env_file(BASE / "gateway.env")
    for generator in _kustomization(OVERLAY).get("configMapGenerator", []):
        if generator["name"] == "gateway-env":
            for literal in generator.get("literals", []):
                key, _, value = literal.partition("=")
                env[key] = value
    return env


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def _env_names() -> dict[str, str]:
    """Every GATEWAY_* variable deploy/ sets, with its value ("" when from a reference)."""
    names: dict[str, str] = dict(_k8s_settings_env())
    for doc in _source_docs():
        for container in _containers(doc):
            for item in container.get("env", []):
                names[item["name"]] = str(item.get("value", ""))
    for service in _compose()["services"].values():
        names.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    for match in re.finditer(r"(GATEWAY_[A-Z_]+)=(\S+)", (DEPLOY / "Dockerfile").read_text()):
        names[match.group(1)] = match.group(2)
    return {k: v for k, v in names.items() if k.startswith("GATEWAY_")}


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


def _k8s_settings() -> Settings:
    env = {k: v for k, v in _k8s_settings_env().items() if k.startswith("GATEWAY_")}
    nested: dict[str, Any] = {}
    for key, value in env.items():
        path = key.removeprefix("GATEWAY_").lower().split("__")
        target = nested
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return Settings(**nested)


# --- settings -------------------------------------------------------------------------


def test_every_gateway_variable_is_a_real_setting() -> None:
    names = _env_names()
    assert len(names) >= 15
    unknown = sorted(name for name in names if not _setting_exists(name))
    assert unknown == []


def test_the_deployments_values_parse_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _env_names().items():
        if value and "$" not in value:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_VAULT__ROLE_ID", "role")
    monkeypatch.setenv("GATEWAY_VAULT__SECRET_ID", "secret")
    settings = Settings()
    assert settings.http.host == "0.0.0.0"  # noqa: S104  # inside a container
    k8s = _k8s_settings()
    assert k8s.ops.host == "0.0.0.0"  # noqa: S104  # reached through the NetworkPolicy only
    assert k8s.kafka.create_topics is False  # the topics Job creates them, compacted
    compose_env = _compose()["services"]["gateway-1"]["environment"]
    assert compose_env["GATEWAY_OPS__HOST"] == "0.0.0.0"  # noqa: S104  # port mapped to loopback


def test_no_secret_in_a_configmap_or_compose_literal() -> None:
    secret_settings = {"GATEWAY_VAULT__TOKEN", "GATEWAY_VAULT__SECRET_ID", "GATEWAY_OPS__TOKEN"}
    assert not secret_settings & set(_k8s_settings_env())
    env = {
        item["name"]: item
        for container in _containers(_deployment())
        for item in container.get("env", [])
    }
    for name in ("GATEWAY_VAULT__ROLE_ID", "GATEWAY_VAULT__SECRET_ID", "GATEWAY_OPS__TOKEN"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert env["GATEWAY_VAULT__SECRET_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "gateway-vault",
        "key": "secret_id",
    }
    assert env["GATEWAY_VAULT__ROLE_ID"]["valueFrom"]["secretKeyRef"]["key"] == "role_id"
    # compose takes the operators' token from the shell, with a development default
    token = _compose()["services"]["gateway-1"]["environment"]["GATEWAY_OPS__TOKEN"]
    assert token.startswith("${GATEWAY_OPS__TOKEN")


def test_compose_services_wait_for_setup_and_publish_on_loopback_only() -> None:
    services = _compose()["services"]
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for other, when in (service.get("depends_on") or {}).items():
            assert other in services, (name, other)
            assert when["condition"] in conditions, (name, other)
            if when["condition"] == "service_healthy":
                assert "healthcheck" in services[other], other
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    for name in ("gateway-1", "gateway-2"):
        waits = services[name]["depends_on"]
        assert waits["topics"]["condition"] == "service_completed_successfully"
        assert waits["vault-bootstrap"]["condition"] == "service_completed_successfully"
        published = {p.rsplit(":", 1)[1] for p in services[name]["ports"]}
        assert published == {"8080", "9464"}  # the tenant API and the ops listener
        assert services[name]["environment"]["GATEWAY_KAFKA__CREATE_TOPICS"] == "false"


def test_unknown_names_are_detected() -> None:
    assert _setting_exists("GATEWAY_KAFKA__GROUP_ID")
    assert not _setting_exists("GATEWAY_KAFKA__GROUPID")
    assert not _setting_exists("GATEWAY_NOPE")


# --- the Deployment against the gateway -------------------------------------------------


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_ports_and_probes_hit_the_real_listeners_and_endpoints() -> None:
    settings = _k8s_settings()
    container = _one_container(_deployment(), "gateway")
    ports = _ports(container)
    assert ports == {"http": settings.http.port, "ops": settings.ops.port}
    served = set(ops_document(settings, admin=False)["paths"])
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] == "ops"
        assert probe["path"] in served
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.ops.port
    assert annotations["prometheus.io/path"] in served


def _one_container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in _containers(doc) if c["name"] == name]
    return found


def test_grace_period_covers_the_whole_shutdown() -> None:
    settings = _k8s_settings()
    spec = _deployment()["spec"]["template"]["spec"]
    container = _one_container(_deployment(), "gateway")
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    worst = (
        float(pre_stop[1])
        + settings.http.shutdown_timeout_s
        + settings.shutdown_grace_s
        + settings.kafka.produce_timeout_s
    )
    assert spec["terminationGracePeriodSeconds"] >= worst + 10
    compose = _compose()["services"]
    compose_env = compose["gateway-1"]["environment"]
    compose_worst = float(compose_env["GATEWAY_SHUTDOWN_GRACE_S"]) + float(
        compose_env["GATEWAY_KAFKA__PRODUCE_TIMEOUT_S"]
    )
    for name in ("gateway-1", "gateway-2"):
        assert float(compose[name]["stop_grace_period"].rstrip("s")) > compose_worst


def test_every_container_is_locked_down() -> None:
    for doc in _source_docs():
        if doc["kind"] not in {"Deployment", "Job"}:
            continue
        pod = doc["spec"]["template"]["spec"]
        name = doc["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # Only the vault bootstrap Job talks to the Kubernetes API (to write its Secret).
        assert pod["automountServiceAccountToken"] is (name == "gateway-vault-bootstrap"), name
        writable = {
            v["name"] for v in pod["volumes"] if "emptyDir" in v and v["emptyDir"]["sizeLimit"]
        }
        for container in _containers(doc):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            resources = container["resources"]
            assert resources["requests"]["cpu"], name
            assert resources["requests"]["memory"], name
            assert resources["limits"]["memory"], name
            for mount in container.get("volumeMounts", []):
                if mount["name"] in writable:
                    assert mount["mountPath"] == "/tmp", name  # noqa: S108  # the emptyDir
                else:
                    assert mount.get("readOnly") is True, (name, mount)
    accounts = [d for d in _source_docs() if d["kind"] == "ServiceAccount"]
    assert accounts
    assert all(account["automountServiceAccountToken"] is False for account in accounts)


def test_a_bad_catalog_never_starts_a_pod() -> None:
    deployment = _deployment()
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    assert init["args"] == ["tenants", "check"]
    assert init["image"] == main["image"]
    assert init["envFrom"] == main["envFrom"]
    assert init["volumeMounts"] == main["volumeMounts"]


def test_the_example_catalog_and_policies_load(tmp_path: Path) -> None:
    """What the ConfigMaps mount is a catalog `gateway tenants check` accepts."""
    policies = tmp_path / "policies"
    (policies / "vault").mkdir(parents=True)
    for generator in _kustomization(BASE)["configMapGenerator"]:
        if generator["name"] == "gateway-policies":
            for entry in generator["files"]:
                key, _, source = entry.partition("=")
                target = key.replace("vault-", "vault/", 1) if key.endswith(".hcl") else key
                shutil.copy(BASE / source, policies / target)
    catalog = load_catalog(OVERLAY / "tenants", policies)
    assert {t.id for t in catalog} == {p.stem for p in (ROOT / "tenants").glob("*.toml")}
    # What the init container runs, on what the ConfigMaps mount.
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "tenants", "check"],
        env={
            "PATH": "/usr/bin:/bin",
            "GATEWAY_TENANTS_DIR": str(OVERLAY / "tenants"),
            "GATEWAY_POLICIES_DIR": str(policies),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok: 3 tenants" in check.stdout
    # The mount layout: the policies ConfigMap's items put the templates under vault/.
    volumes = {v["name"]: v for v in _deployment()["spec"]["template"]["spec"]["volumes"]}
    items = {i["key"]: i["path"] for i in volumes["policies"]["configMap"]["items"]}
    assert items == {
        "quotas.toml": "quotas.toml",
        "vault-gateway.hcl": "vault/gateway.hcl",
        "vault-tenant.hcl": "vault/tenant.hcl",
    }


def test_image_installs_only_the_lean_lock_and_ships_the_scripts() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "--no-deps -r requirements/runtime.txt" in dockerfile
    assert "--no-deps ." in dockerfile
    assert "USER gateway" in dockerfile
    assert "COPY deploy/scripts scripts" in dockerfile  # WORKDIR /app
    for doc in _source_docs():
        for container in _containers(doc):
            command = container.get("command", [])
            if command[:1] == ["python"]:
                script = Path(command[1])
                assert script.parent == Path("/app/scripts")
                assert (SCRIPTS / script.name).is_file()
    for service in _compose()["services"].values():
        entry = service.get("entrypoint", [])
        if entry[:1] == ["python"]:
            assert (SCRIPTS / Path(entry[1]).name).is_file()


# --- kustomize ------------------------------------------------------------------------


def test_kustomizations_list_exactly_their_files() -> None:
    assert {p.relative_to(K8S) for p in _kustomizations()} == {
        Path("base"),
        Path("overlays/example"),
        Path("components/keda"),
        Path("components/prometheus-operator"),
    }
    for directory in _kustomizations():
        kustomization = _kustomization(directory)
        used = {directory / "kustomization.yaml"}
        for resource in kustomization.get("resources", []):
            path = (directory / resource).resolve()
            assert path.is_file() or (path / "kustomization.yaml").is_file(), resource
            used.add(path)
        for component in kustomization.get("components", []):
            path = (directory / component).resolve()
            assert _kustomization(path)["kind"] == "Component", component
        for generator in kustomization.get("configMapGenerator", []):
            for entry in [*generator.get("files", []), *generator.get("envs", [])]:
                key, _, source = entry.rpartition("=") if "=" in entry else ("", "", entry)
                assert re.fullmatch(r"[-._a-zA-Z0-9]*", key), key
                path = (directory / source).resolve()
                assert path.is_file(), source
                assert directory.resolve() in path.parents, f"{source}: kustomize refuses it"
                used.add(path)
        present = {p.resolve() for p in directory.rglob("*") if p.is_file()}
        assert present - {p.resolve() for p in used} == set(), directory


def test_copies_equal_their_sources() -> None:
    """The PrometheusRule, the k8s policies and the example catalog (deploy/sync.py)."""
    assert [str(p.relative_to(ROOT)) for p in sync.stale()] == []


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomize renders are not checked")
    return kubectl


def _render(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {"base": _render(BASE), "example": _render(OVERLAY)}


def test_the_example_overlay_renders_one_consistent_installation(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["example"]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Job") == 2
    assert "HorizontalPodAutoscaler" not in kinds  # KEDA's component replaced it
    assert kinds.count("ScaledObject") == kinds.count("ServiceMonitor") == 1
    assert kinds.count("PrometheusRule") == 1
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "gateway", doc["metadata"]["name"]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    (env_name,) = [n for n in configmaps if n.startswith("gateway-env-")]  # hashed: rolls pods
    assert {"gateway-catalog", "gateway-policies"} <= set(configmaps)  # in place: hot reload
    catalog = configmaps["gateway-catalog"]["data"]
    assert set(catalog) == {p.name for p in (ROOT / "tenants").glob("*.toml")}
    env = configmaps[env_name]["data"]
    assert env == _k8s_settings_env()
    scaled = _one(docs, "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]["metadata"]
    assert trigger["bootstrapServers"] == env["GATEWAY_KAFKA__BOOTSTRAP_SERVERS"]
    assert trigger["consumerGroup"] == env["GATEWAY_KAFKA__GROUP_ID"]
    # every reference resolves: ConfigMaps in the render, Secrets created out of band
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
        for container in _containers(doc):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in EXTERNAL_SECRETS, ref
            assert container["image"].startswith("registry.example.com/tenant-worker-gateway:")


def test_services_policies_and_autoscalers_point_at_the_replicas(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["example"]
    deployment = _one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = _ports(_one_container(deployment, "gateway"))
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(services) == {"gateway", "gateway-ops"}
    for service in services.values():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    assert [p["targetPort"] for p in services["gateway-ops"]["spec"]["ports"]] == ["ops"]
    # Job pods are no replicas: no Service, PDB or NetworkPolicy selects them.
    for job in (d for d in docs if d["kind"] == "Job"):
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert not pod_labels.items() <= labels.items()
    policy = _one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    reach = {}
    for rule in policy["spec"]["ingress"]:
        (port,) = rule["ports"]
        (peer,) = rule["from"]
        reach[port["port"]] = peer["namespaceSelector"]["matchLabels"]
    assert reach == {
        "ops": {"kubernetes.io/metadata.name": "monitoring"},
        "http": {"kubernetes.io/metadata.name": "ingress-nginx"},
    }
    monitor = _one(docs, "ServiceMonitor")
    selects = monitor["spec"]["selector"]["matchLabels"].items()
    assert selects <= services["gateway-ops"]["metadata"]["labels"].items()
    assert not selects <= services["gateway"]["metadata"]["labels"].items(), "tenant port"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "ops"
    assert endpoint["path"] == "/metrics"
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    partitions = int(_k8s_settings_env()["GATEWAY_KAFKA__PARTITIONS"])
    scaled = _one(docs, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= partitions
    assert scaled["cooldownPeriod"] > 0
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == _k8s_settings().topics.jobs
    assert int(trigger["metadata"]["lagThreshold"]) > 0
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    hpa = _one(rendered["base"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] <= partitions
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it


def _validate_core(docs: list[dict[str, Any]]) -> set[str]:
    """Strict (unknown fields are errors) against each supported version; the kinds seen."""
    unique = {json.dumps(d, sort_keys=True): d for d in docs if d["kind"] not in CUSTOM_KINDS}
    for doc in unique.values():
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {exc.message}")
    return {d["kind"] for d in unique.values()}


def test_manifests_as_written_validate_against_the_kubernetes_schemas() -> None:
    assert _validate_core(_source_docs()) >= {
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Job",
        "Role",
        "RoleBinding",
    }


def test_rendered_manifests_validate_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    assert "ConfigMap" in _validate_core([*rendered["base"], *rendered["example"]])
    for doc in rendered["example"]:
        if doc["kind"] in CUSTOM_KINDS:
            _check_custom(doc)


def test_the_schema_check_catches_mistakes() -> None:
    deployment = _deployment()
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 90  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# --- custom resources: compact checks written from their CRDs -----------------------------

_STR: dict[str, Any] = {"type": "string"}
_INT32: dict[str, Any] = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_STR_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
# The duration pattern of the prometheus-operator CRDs.
_DURATION: dict[str, Any] = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP},
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


# KEDA's ScaledObject, keda.sh/v1alpha1: the spec's fields, types and required ones from
# kedacore/keda config/crd/bases/keda.sh_scaledobjects.yaml (KEDA 2.x, the
# apiextensions.k8s.io/v1 CRD generated by controller-gen v0.6.1). The spec is closed to
# those fields, so a misspelt one fails here rather than being pruned silently; later KEDA
# releases add fields (initialCooldownPeriod, ...): add them here when the manifest uses
# them. Trigger metadata values are strings in the CRD (lagThreshold: "1000").
SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    {
        "type": "object",
        "required": ["scaleTargetRef", "triggers"],
        "additionalProperties": False,
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "apiVersion": _STR,
                    "kind": _STR,
                    "name": _STR,
                    "envSourceContainerName": _STR,
                },
            },
            "minReplicaCount": _INT32,
            "maxReplicaCount": _INT32,
            "idleReplicaCount": _INT32,
            "pollingInterval": _INT32,
            "cooldownPeriod": _INT32,
            "fallback": {
                "type": "object",
                "required": ["failureThreshold", "replicas"],
                "properties": {"failureThreshold": _INT32, "replicas": _INT32},
            },
            "advanced": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {
                        "type": "object",
                        "properties": {
                            "behavior": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "scaleUp": {"$ref": "#/$defs/rules"},
                                    "scaleDown": {"$ref": "#/$defs/rules"},
                                },
                            }
                        },
                    },
                },
            },
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["metadata", "type"],
                    "additionalProperties": False,
                    "properties": {
                        "type": _STR,
                        "name": _STR,
                        "metadata": _STR_MAP,
                        "metricType": {"enum": ["Value", "AverageValue", "Utilization"]},
                        "authenticationRef": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": _STR, "kind": _STR},
                        },
                    },
                },
            },
        },
    },
)
SCALED_OBJECT["$defs"] = {
    "rules": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "selectPolicy": _STR,
            "stabilizationWindowSeconds": _INT32,
            "policies": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["periodSeconds", "type", "value"],
                    "properties": {"periodSeconds": _INT32, "type": _STR, "value": _INT32},
                },
            },
        },
    }
}

# The Prometheus operator's ServiceMonitor, monitoring.coreos.com/v1: from
# prometheus-operator example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml
# (operator 0.87.0): spec requires `selector` and `endpoints`; the endpoint fields we use
# are typed (port: the Service port's name; interval, scrapeTimeout: durations).
SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["endpoints", "selector"],
        "properties": {
            "jobLabel": _STR,
            "selector": {
                "type": "object",
                "properties": {
                    "matchLabels": _STR_MAP,
                    "matchExpressions": {
                        "type": "array",
                        "items": {"type": "object", "required": ["key", "operator"]},
                    },
                },
            },
            "namespaceSelector": {
                "type": "object",
                "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array"}},
            },
            "endpoints": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "port": _STR,
                        "targetPort": {"type": ["integer", "string"]},
                        "path": _STR,
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "honorLabels": {"type": "boolean"},
                    },
                },
            },
        },
    },
)

# The Prometheus operator's PrometheusRule, monitoring.coreos.com/v1: from
# prometheus-operator example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml
# (operator 0.76.0): groups need a non-empty name (unique: a list-map keyed by name),
# rules need expr (int or string), and exactly one of alert and record.
PROMETHEUS_RULE = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "limit": {"type": "integer"},
                        "partial_response_strategy": _STR,
                        "query_offset": _DURATION,
                        "labels": _STR_MAP,
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "additionalProperties": False,
                                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                "properties": {
                                    "alert": _STR,
                                    "record": _STR,
                                    "expr": {"type": ["integer", "string"]},
                                    "for": _DURATION,
                                    "keep_firing_for": _DURATION,
                                    "labels": _STR_MAP,
                                    "annotations": _STR_MAP,
                                },
                            },
                        },
                    },
                },
            }
        },
    },
)
CRD_SCHEMAS = {
    "ScaledObject": SCALED_OBJECT,
    "ServiceMonitor": SERVICE_MONITOR,
    "PrometheusRule": PROMETHEUS_RULE,
}


def _check_custom(doc: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(CRD_SCHEMAS[doc["kind"]]).validate(doc)
    if doc["kind"] == "PrometheusRule":
        names = [g["name"] for g in doc["spec"]["groups"]]
        assert len(names) == len(set(names)), "group names are the list's keys"
    if doc["kind"] == "ServiceMonitor":
        for endpoint in doc["spec"]["endpoints"]:
            # the operator rejects a scrape timeout above the interval
            if "interval" in endpoint and "scrapeTimeout" in endpoint:
                assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", duration))


def test_custom_resources_match_their_crds() -> None:
    found = [d for d in _source_docs() if d["kind"] in CUSTOM_KINDS]
    assert {d["kind"] for d in found} == CUSTOM_KINDS
    for doc in found:
        _check_custom(doc)


@pytest.mark.parametrize(
    ("kind", "breaks"),
    [
        ("ScaledObject", lambda s: s["spec"].pop("scaleTargetRef")),
        ("ScaledObject", lambda s: s["spec"].update(maxReplicas=3)),  # the HPA's name
        ("ScaledObject", lambda s: s["spec"]["triggers"][0]["metadata"].update(lagThreshold=5)),
        ("ServiceMonitor", lambda s: s["spec"].pop("selector")),
        ("ServiceMonitor", lambda s: s["spec"]["endpoints"][0].update(interval="30 seconds")),
        ("PrometheusRule", lambda s: s["spec"]["groups"][0]["rules"][0].pop("expr")),
        ("PrometheusRule", lambda s: s["spec"]["groups"][0]["rules"][0].update(record="x")),
        ("PrometheusRule", lambda s: s["spec"]["groups"][0]["rules"][0].update(For="5m")),
    ],
)
def test_the_crd_checks_catch_mistakes(kind: str, breaks: Any) -> None:
    (doc,) = [d for d in _source_docs() if d["kind"] == kind]
    breaks(doc)
    with pytest.raises(jsonschema.ValidationError):
        _check_custom(doc)


# --- alerts, dashboard and the metrics they use --------------------------------------------

REQUIRED_ALERTS = {
    "GatewayConsumerLagRising",
    "GatewayTenantThrottled",
    "GatewayDLQGrowing",
    "GatewayBrokerDown",
    "GatewayVaultDown",
    "GatewayApiProcessRestarting",
    "GatewayJobsTimingOut",
    "GatewayCrossTenantDenials",
}


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_playbook_a_severity_and_a_unit_test() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert set(names) >= REQUIRED_ALERTS
    assert len(names) == len(set(names))
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert tested == set(names), "every alert needs a promtool test that fires it"
    anchors = _anchors(RUNBOOK.read_text())
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        annotations = rule["annotations"]
        assert annotations["summary"]
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert (ROOT / path) == RUNBOOK
        assert anchor == rule["alert"].lower()
        assert anchor in anchors, f"RUNBOOK.md has no section {rule['alert']}"


@pytest.mark.parametrize("document", [RUNBOOK, DEPLOY / "README.md"], ids=lambda p: p.name)
def test_the_docs_links_resolve(document: Path) -> None:
    """Relative links of the runbook and the index: the file exists, and so does the section."""
    links = re.findall(r"\]\(([^)\s]+)\)", document.read_text())
    assert links
    for link in links:
        if "://" in link:
            continue
        path, _, anchor = link.partition("#")
        target = (document.parent / path).resolve() if path else document
        assert target.exists(), link
        if anchor:
            assert anchor in _anchors(target.read_text()), link


def _promtool() -> str:
    found = shutil.which("promtool") or str(ROOT / ".venv" / "bin" / "promtool")
    if not Path(found).is_file():
        pytest.skip(
            "promtool not installed (Debian's prometheus package; `make promtool` fetches it)"
        )
    return found


@pytest.mark.parametrize(
    "command",
    [["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]],
    ids=["check-rules", "test-rules"],
)
def test_promtool(command: list[str]) -> None:
    done = subprocess.run(
        [_promtool(), *command], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    | {"and", "or", "unless", "offset", "inf", "nan", "atan2", "start", "end"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana variables allowed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # $__rate_interval, ${job}
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in _PROMQL_WORDS:
            continue  # a function, an aggregation or a keyword
        names.add(match.group())
    return names


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            exprs.append(inner.group(1) if inner else query)
    return exprs


def _used_metrics() -> dict[str, set[str]]:
    return {
        "alerts": {n for rule in _alert_rules() for n in metric_names(rule["expr"])},
        "dashboard": {n for e in _dashboard_expressions() for n in metric_names(e)},
    }


def test_metric_names_parse_from_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, tenant) (rate(a_bucket{job=~"$job"}[5m])))'
    ) == {"a_bucket"}
    assert metric_names("sum(x) by (le) / on (tenant) group_left (y) 1e3 * b offset 5m") == {
        "x",
        "b",
    }
    assert metric_names('deriv(sum(c{topic="jobs"})[10m:1m]) > 0 and up == 1') == {"c", "up"}


def test_alerts_and_dashboard_use_only_gateway_metrics() -> None:
    used = _used_metrics()
    assert len(used["alerts"]) >= 9
    assert len(used["dashboard"]) >= 25
    for where, names in used.items():
        strange = {n for n in names if not n.startswith("gateway_") and n not in STANDARD_METRICS}
        assert strange == set(), where


def test_the_dashboard_is_well_formed_and_covers_the_brief() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "tenant"} <= variables
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
    families = {_family(n) for n in _used_metrics()["dashboard"]}
    assert families >= {
        "gateway_jobs_total",  # throughput by tenant
        "gateway_job_duration_seconds",  # latency by tenant
        "gateway_tenant_running",  # quota use
        "gateway_tenant_throttled_total",  # throttling
        "gateway_consumer_lag",
        "gateway_dlq_total",  # DLQ growth by reason
        "gateway_dlq_pending",
        "gateway_vault_cache_hit_ratio",
        "gateway_vault_up",
        "gateway_http_request_duration_seconds",  # API latency
        "gateway_broker_up",
    }


_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def _family(name: str) -> str:
    """The family a sample name belongs to (histogram parts to the histogram)."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _exported(name: str, families: set[str]) -> bool:
    """Whether `name` (as a query names it) is a sample of one of the scraped families."""
    family = _family(name)
    return bool({name, family, f"{family}_total"} & families) or (
        name.endswith("_total") and name.removesuffix("_total") in families
    )


# --- the live scrape ------------------------------------------------------------------------

TOKEN = "operator-token-for-deploy-tests"


def _ops_port(process: Any) -> int | None:
    lines = [line for line in process.log_lines() if line.get("event") == "ops_started"]
    return int(lines[-1]["port"]) if lines else None


@pytest.mark.integration
async def test_every_metric_the_alerts_and_dashboard_use_is_exported(
    settings: Settings, client: JobClient, openbao: VaultServer, gateway_process: Any
) -> None:
    configured = settings.model_copy(update={"vault": openbao.gateway_vault})
    process = gateway_process(
        configured,
        "metrics",
        GATEWAY_OPS__ENABLED="true",
        GATEWAY_OPS__PORT="0",
        GATEWAY_OPS__TOKEN=TOKEN,
    )
    process.start()
    await wait_for(lambda: _ops_port(process), 60)
    # labeled families get samples: outcomes, a retry, a secret read, a dead letter
    await client.job("acme", "echo-1", "echo", n=1)
    await client.job("globex", "fail-1", "fail", retryable=True, succeed_on_attempt=2)
    await client.job("initech", "digest-1", "secret_digest", path="app", key="api_key")
    await client.send("acme", b"{not json")
    await client.flush()
    base = f"http://127.0.0.1:{_ops_port(process)}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as ops:

        async def scraped() -> str | None:
            text = (await ops.get("/metrics")).text
            done = 'outcome="succeeded"' in text and 'reason="malformed_json"' in text
            return text if done else None

        await wait_for(scraped, 60)
        text = await scraped()
        assert text is not None
        admin = await ops.get("/admin/v1/tenants", headers={"Authorization": f"Bearer {TOKEN}"})
        assert admin.status_code == 200
        # the Deployment's probes answer on the port they name
        container = _one_container(_deployment(), "gateway")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container[kind]["httpGet"]
            assert probe["port"] == "ops"
            await wait_for(functools.partial(_answers, ops, probe["path"]), 30)
    families = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    used = _used_metrics()
    missing = {
        where: sorted(n for n in names if not _exported(n, families) and n not in STANDARD_METRICS)
        for where, names in used.items()
    }
    assert missing == {"alerts": [], "dashboard": []}, sorted(families)


async def _answers(client: httpx.AsyncClient, path: str) -> bool:
    return (await client.get(path)).status_code == 200


# --- deploy/scripts ---------------------------------------------------------------------------


def test_the_topic_plan() -> None:
    settings = Settings(kafka=KafkaSettings(partitions=12), max_delay_s=7 * 86400)
    plans = {p.name: p for p in create_topics.plan(settings, replication_factor=3)}
    assert set(plans) == set(settings.topics.all())
    assert all(p.partitions == 12 for p in plans.values())
    control = plans[settings.topics.control].configs
    assert control["cleanup.policy"] == "compact"
    assert "retention.ms" not in control
    for topic in (settings.topics.retry, settings.topics.deferred):
        assert int(plans[topic].configs["retention.ms"]) >= 2 * 7 * 86400 * 1000
    assert {p.name for p in plans.values() if p.grouped} == {
        settings.topics.jobs,
        settings.topics.retry,
        settings.topics.deferred,
    }
    assert all(p.configs["min.insync.replicas"] == "2" for p in plans.values())
    single = create_topics.plan(settings, replication_factor=1)
    assert all("min.insync.replicas" not in p.configs for p in single)


@pytest.mark.integration
async def test_create_topics_on_a_real_broker(tansu: Tansu) -> None:
    settings = make_settings(tansu.bootstrap, partitions=3)
    first = await create_topics.apply(settings, 1)
    assert first.problems == []
    assert sorted(line for line in first.lines if line.startswith("created")) == sorted(
        f"created {t}" for t in settings.topics.all()
    )
    again = await create_topics.apply(settings, 1)
    assert again.problems == []
    assert not any(line.startswith("created") for line in again.lines)
    assert sum(line.startswith("exists") for line in again.lines) == 7
    # A control topic someone created without compaction is refused, loudly.
    other = make_settings(tansu.bootstrap, partitions=3)
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(other.topics.control, 3, 1, topic_configs={"cleanup.policy": "delete"})]
        )
    finally:
        await admin.close()
    refused = await create_topics.apply(other, 1)
    assert [p for p in refused.problems if "cleanup.policy" in p and other.topics.control in p]


def test_the_bootstrap_output_is_split_from_its_credentials() -> None:
    shown, found = vault_job.split_output(
        "policy gateway: created\n"
        "export GATEWAY_VAULT__ROLE_ID=role-123\n"
        "export GATEWAY_VAULT__SECRET_ID=secret-456\n"
        "ok: 3 tenants bootstrapped in http://vault:8200\n"
    )
    assert found == {"role_id": "role-123", "secret_id": "secret-456"}
    assert shown == ["policy gateway: created", "ok: 3 tenants bootstrapped in http://vault:8200"]


class _FakeSecrets(BaseHTTPRequestHandler):
    """The Secrets endpoints of one namespace of a Kubernetes API server, in memory."""

    store: ClassVar[dict[str, dict[str, Any]]] = {}
    calls: ClassVar[list[tuple[str, str]]] = []

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _name(self) -> str:
        assert self.path.startswith("/api/v1/namespaces/gateway/secrets")
        assert self.headers["Authorization"] == "Bearer sa-token"
        return self.path.rsplit("/secrets", 1)[1].strip("/")

    def do_GET(self) -> None:
        name = self._name()
        self.calls.append(("GET", name))
        if name in self.store:
            self._answer(200, self.store[name])
        else:
            self._answer(404, {"kind": "Status", "code": 404})

    def _write(self, method: str, status: int) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = self._name() or body["metadata"]["name"]
        self.calls.append((method, name))
        self.store[name] = body
        self._answer(status, body)

    def do_POST(self) -> None:
        self._write("POST", 201)

    def do_PUT(self) -> None:
        self._write("PUT", 200)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def kube_api() -> Iterator[Any]:
    _FakeSecrets.store = {}
    _FakeSecrets.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSecrets)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield vault_job.KubeSecrets(
            base_url=f"http://127.0.0.1:{server.server_address[1]}",
            namespace="gateway",
            token="sa-token",
        )
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_the_vault_bootstrap_job_stores_working_credentials_and_logs_none(
    openbao: VaultServer,
    kube_api: Any,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GATEWAY_VAULT__ADDR", openbao.bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", openbao.bao.root_token)
    monkeypatch.setenv("GATEWAY_TENANTS_DIR", str(ROOT / "tenants"))
    monkeypatch.setenv("GATEWAY_POLICIES_DIR", str(ROOT / "policies"))
    assert vault_job.run(kube_api, "gateway-vault", rotate=False) == 0
    stored = _FakeSecrets.store["gateway-vault"]["data"]
    credentials = {k: base64.b64decode(v).decode() for k, v in stored.items()}
    assert set(credentials) == {"role_id", "secret_id"}
    output = capfd.readouterr()
    assert credentials["secret_id"] not in output.out + output.err
    assert "stored role_id and secret_id in Secret gateway-vault" in output.out
    login = hvac.Client(url=openbao.bao.addr, timeout=5).auth.approle.login(
        role_id=credentials["role_id"], secret_id=credentials["secret_id"]
    )
    assert "gateway" in login["auth"]["policies"]
    # Again (a new tenant, say): policies and roles, the credentials left alone.
    assert vault_job.run(kube_api, "gateway-vault", rotate=False) == 0
    assert [c for c in _FakeSecrets.calls if c[0] != "GET"] == [("POST", "gateway-vault")]
    assert "left as they are" in capfd.readouterr().out
    # Rotation: a new secret_id replaces the stored one.
    assert vault_job.run(kube_api, "gateway-vault", rotate=True) == 0
    rotated = base64.b64decode(_FakeSecrets.store["gateway-vault"]["data"]["secret_id"]).decode()
    assert rotated != credentials["secret_id"]
    assert _FakeSecrets.calls[-1] == ("PUT", "gateway-vault")
    assert rotated not in capfd.readouterr().out
