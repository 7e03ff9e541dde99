"""`gateway vault bootstrap --approle` for Kubernetes, without the secret_id in any log.

The Job `gateway-vault-bootstrap` runs this (the image ships it as
/app/scripts/vault_bootstrap_job.py) with an administrator's Vault token in `VAULT_TOKEN`:

    python vault_bootstrap_job.py [--secret gateway-vault] [--rotate]

It runs `gateway vault bootstrap` (per-tenant policies and token roles, the gateway's
policy: idempotent, so running it again after a catalog change sets up the new
tenants), adding `--approle` when the Secret does not exist yet or `--rotate` asks for a
new secret_id. The AppRole's `role_id` and `secret_id` go straight into the Secret (keys
`role_id`, `secret_id`, which the Deployment reads) through the Kubernetes API with the
Job's own service account; every other line of the command's output is printed, the
two credential lines never are.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_EXPORTS = {
    "export GATEWAY_VAULT__ROLE_ID=": "role_id",
    "export GATEWAY_VAULT__SECRET_ID=": "secret_id",
}


@dataclass(frozen=True)
class KubeSecrets:
    """Just enough of the Kubernetes API to read and write one namespace's Secrets."""

    base_url: str
    namespace: str
    token: str
    context: ssl.SSLContext | None = None

    @classmethod
    def in_cluster(cls) -> KubeSecrets:
        """The API server and credentials a pod's service account gets."""
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return cls(
            base_url=f"https://{host}:{port}",
            namespace=(_SA / "namespace").read_text().strip(),
            token=(_SA / "token").read_text().strip(),
            context=ssl.create_default_context(cafile=str(_SA / "ca.crt")),
        )

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        request = urllib.request.Request(  # noqa: S310  # the API server's https URL
            f"{self.base_url}/api/v1/namespaces/{self.namespace}/secrets{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as answer:  # noqa: S310
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def exists(self, name: str) -> bool:
        status = self._call("GET", f"/{name}")
        if status not in (200, 404):
            raise RuntimeError(f"reading Secret {name}: HTTP {status}")
        return status == 200

    def store(self, name: str, data: dict[str, str], *, replace: bool) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "gateway"}},
            "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        status = self._call("PUT", f"/{name}", body) if replace else self._call("POST", "", body)
        if status not in (200, 201):
            raise RuntimeError(f"writing Secret {name}: HTTP {status}")


def split_output(stdout: str) -> tuple[list[str], dict[str, str]]:
    """The command's lines without the credentials, and the credentials."""
    shown: list[str] = []
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        for prefix, key in _EXPORTS.items():
            if line.startswith(prefix):
                found[key] = line.removeprefix(prefix).strip()
                break
        else:
            shown.append(line)
    return shown, found


def run(kube: KubeSecrets, secret: str, *, rotate: bool, extra: Sequence[str] = ()) -> int:
    """Bootstrap Vault; store new AppRole credentials in `secret` when asked or missing."""
    approle = rotate or not kube.exists(secret)
    command = [sys.executable, "-m", "gateway", "vault", "bootstrap", *extra]
    if approle:
        command.append("--approle")
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    shown, found = split_output(done.stdout)
    for line in shown:
        print(line)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        return done.returncode
    if not approle:
        print(f"Secret {secret} exists: AppRole credentials left as they are (--rotate replaces)")
        return 0
    if set(found) != set(_EXPORTS.values()):
        print("error: the bootstrap printed no AppRole credentials", file=sys.stderr)
        return 1
    kube.store(secret, found, replace=kube.exists(secret))
    print(f"stored role_id and secret_id in Secret {secret} (not shown)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--secret", default="gateway-vault", help="the Secret to write")
    parser.add_argument(
        "--rotate", action="store_true", help="issue a new secret_id even if the Secret exists"
    )
    parser.add_argument("--seed-demo", action="store_true", help="passed on: write example secrets")
    args = parser.parse_args(argv)
    extra = ["--seed-demo"] if args.seed_demo else []
    return run(KubeSecrets.in_cluster(), args.secret, rotate=args.rotate, extra=extra)


if __name__ == "__main__":
    sys.exit(main())
