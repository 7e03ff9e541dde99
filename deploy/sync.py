"""Regenerate the files under deploy/ that copy or wrap other files of the repository.

Kustomize reads no file outside a kustomization's directory, and the Prometheus
operator wants the alerting rules inside a custom resource, so these are kept as copies:

- k8s/components/prometheus-operator/prometheusrule.yaml: prometheus/alerts.yaml's
  groups, verbatim, as a PrometheusRule;
- k8s/base/policies/: policies/quotas.toml and policies/vault/*.hcl;
- k8s/overlays/example/tenants/: the demo catalog, tenants/*.toml.

    python deploy/sync.py          # rewrite them
    python deploy/sync.py --check  # exit 1 naming every copy that differs

tests/test_deploy.py runs the check, so a copy never drifts from its source.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
PROMETHEUS_RULE = DEPLOY / "k8s" / "components" / "prometheus-operator" / "prometheusrule.yaml"

_RULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by `python deploy/sync.py`: edit that
# file, not this one (tests/test_deploy.py fails while they differ).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: gateway
  labels: {app.kubernetes.io/name: gateway}
spec:
"""


def prometheus_rule(alerts: str) -> str:
    """The PrometheusRule whose spec is the rule file's `groups`, text for text."""
    lines = alerts.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return _RULE_HEADER + "\n".join(body) + "\n"


def derived() -> dict[Path, bytes]:
    """Every generated or copied file and the content it must have."""
    files = {PROMETHEUS_RULE: prometheus_rule(ALERTS.read_text()).encode()}
    policies = DEPLOY / "k8s" / "base" / "policies"
    files[policies / "quotas.toml"] = (ROOT / "policies" / "quotas.toml").read_bytes()
    for source in sorted((ROOT / "policies" / "vault").glob("*.hcl")):
        files[policies / "vault" / source.name] = source.read_bytes()
    catalog = DEPLOY / "k8s" / "overlays" / "example" / "tenants"
    for source in sorted((ROOT / "tenants").glob("*.toml")):
        files[catalog / source.name] = source.read_bytes()
    return files


def stale() -> list[Path]:
    """Copies that differ from what their sources say (or are missing)."""
    return [
        path
        for path, content in derived().items()
        if not path.is_file() or path.read_bytes() != content
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report, do not write")
    args = parser.parse_args(argv)
    differing = stale()
    if args.check:
        for path in differing:
            print(f"stale: {path.relative_to(ROOT)} (run: python deploy/sync.py)")
        return 1 if differing else 0
    for path, content in derived().items():
        if path in differing:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
