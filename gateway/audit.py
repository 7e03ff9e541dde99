"""The audit log: one JSON line per attempt to reach across tenants (invariant 3, 2),
and one per operator action through the admin API.

Audit lines go to the `gateway.audit` logger, so operators can route them apart.
Cross-tenant lines name the tenant that acted (the caller, or the job's own tenant for
a flow that emitted a message for another) and never the tenant that was reached for.
Admin lines name the operator's token id (a digest, never the token), the action, its
subject and how many jobs or records it concerned.
"""

from __future__ import annotations

import logging
import time

from gateway.records import rfc3339

__all__ = ["audit_admin", "audit_cross_tenant", "audit_tenant_violation"]

log = logging.getLogger("gateway.audit")


def audit_cross_tenant(*, tenant: str, job_id: str, action: str, source: str) -> None:
    """A caller asked for (`action`: get or cancel) a job id that belongs to another tenant."""
    log.warning(
        "cross_tenant_denied",
        extra={
            "audit": True,
            "tenant": tenant,
            "job_id": job_id,
            "action": action,
            "at": rfc3339(time.time()),
            "source": source,
        },
    )


def audit_tenant_violation(*, tenant: str, job_id: str, job_type: str, attempt: int) -> None:
    """A job's flow built or emitted a message for another tenant; the job failed."""
    log.warning(
        "tenant_violation",
        extra={
            "audit": True,
            "tenant": tenant,
            "job_id": job_id,
            "type": job_type,
            "attempt": attempt,
            "action": "flow_message",
            "at": rfc3339(time.time()),
            "source": "flow",
        },
    )


def audit_admin(*, action: str, by: str, tenant: str, count: int, detail: str) -> None:
    """An operator paused, resumed, cancelled or redrove through the admin API."""
    log.warning(
        "admin_action",
        extra={
            "audit": True,
            "by": by,
            "action": action,
            "tenant": tenant,
            "count": count,
            "detail": detail,
            "at": rfc3339(time.time()),
        },
    )
