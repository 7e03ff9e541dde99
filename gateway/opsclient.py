"""The CLI's client of the admin API (`GATEWAY_OPS__URL`, `GATEWAY_OPS__TOKEN`), stdlib only."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gateway.errors import GatewayError
from gateway.settings import OpsSettings

__all__ = ["OpsClient", "OpsError"]

_TIMEOUT_S = 30.0


class OpsError(GatewayError):
    """The admin API could not be reached or refused the call (the message says which)."""

    code = "ops_error"


class OpsClient:
    """One method per admin call; answers are the API's JSON."""

    def __init__(self, settings: OpsSettings) -> None:
        if settings.token is None:
            raise OpsError("set GATEWAY_OPS__TOKEN to the operators' token")
        self._base = settings.url.rstrip("/")
        self._token = settings.token.get_secret_value()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(  # noqa: S310  # the operator's own configured URL
            f"{self._base}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:  # noqa: S310
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read())
                why = f"{answer.get('error')}: {answer.get('detail')}"
            except ValueError:
                why = exc.reason
            raise OpsError(f"{method} {path}: {exc.code} {why}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise OpsError(
                f"cannot reach the ops listener at {self._base} ({reason}); check GATEWAY_OPS__URL"
            ) from None

    def tenants(self) -> Any:
        """`GET /admin/v1/tenants`."""
        return self._call("GET", "/admin/v1/tenants")

    def set_state(self, tenant: str, op: str) -> Any:
        """Pause or resume a tenant."""
        quoted = urllib.parse.quote(tenant, safe="")
        return self._call("POST", f"/admin/v1/tenants/{quoted}/{op}")

    def cancel_all(self, tenant: str, job_type: str | None) -> Any:
        """`POST /admin/v1/jobs/cancel`."""
        return self._call("POST", "/admin/v1/jobs/cancel", {"tenant": tenant, "type": job_type})

    def dlq_page(
        self, tenant: str | None, reason: str | None, limit: int, cursor: str | None
    ) -> Any:
        """One page of `GET /admin/v1/dlq`."""
        query = {"tenant": tenant, "reason": reason, "limit": str(limit), "cursor": cursor}
        encoded = urllib.parse.urlencode({k: v for k, v in query.items() if v})
        return self._call("GET", f"/admin/v1/dlq?{encoded}")

    def redrive(self, body: dict[str, Any]) -> Any:
        """`POST /admin/v1/dlq/redrive`."""
        return self._call("POST", "/admin/v1/dlq/redrive", body)
