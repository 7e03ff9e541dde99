"""`webhook`: deliver an event to the tenant's own HTTP endpoint, with the tenant's secret.

The endpoint and its bearer token are the tenant's, in Vault under
`tenants/<tenant>/webhook` (keys `url` and `token`); the job's payload carries only the
event (`{"event": {...}}`). So a tenant can only ever call the endpoint it configured,
with its own credential, and the credential never appears in the job, its result or a
log line (the gateway scrubs any secret value the flow received from what comes out).

The delivery carries an `Idempotency-Key` stable across attempts and replicas, so the
receiver can drop the duplicate a retry may cause. A 5xx or a network error is
retried (with the gateway's backoff); a 4xx is final.

    GATEWAY_FLOWS=examples.webhook gateway run     # with the repository on PYTHONPATH
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gateway import FlowGraph, JobContext, JobError, JobTypes, Message, Node, NodePolicy

__all__ = ["register"]

_TIMEOUT_S = 10.0


def _post(url: str, token: str, key: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(  # noqa: S310  # the scheme is checked by the caller
        url,
        data=body,
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:  # noqa: S310
            return int(response.status), response.read(64 * 1024)
    except urllib.error.HTTPError as error:
        return int(error.code), error.read(64 * 1024)


def webhook(ctx: JobContext) -> FlowGraph:
    """One node: read the tenant's endpoint and token, POST the event, report the answer."""

    async def deliver(message: Message, _: Any) -> Any:
        event = message.payload.get("event")
        if not isinstance(event, dict):
            raise JobError("payload.event must be an object", retryable=False, code="bad_payload")
        url = await ctx.secrets.get("webhook", "url")
        token = await ctx.secrets.get("webhook", "token")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise JobError("the webhook url must be http(s)", retryable=False, code="bad_endpoint")
        body = json.dumps({"job_id": ctx.job_id, "event": event}).encode()
        key = ctx.idempotency_key("deliver")
        try:
            status, answer = await asyncio.to_thread(_post, url, token, key, body)
        except OSError as exc:  # refused, reset, timed out: try again later
            raise JobError(
                f"endpoint unreachable: {type(exc).__name__}", code="unreachable"
            ) from None
        if status >= 500:
            raise JobError(f"endpoint answered {status}", code="endpoint_error")
        if status >= 400:
            raise JobError(f"endpoint refused: {status}", retryable=False, code="endpoint_refused")
        return {"status": status, "answer_sha256": hashlib.sha256(answer).hexdigest()}

    node = Node(
        deliver, name="deliver", policy=NodePolicy(validate="none", timeout_s=_TIMEOUT_S + 5)
    )
    return [(node, [])]


def register(types: JobTypes) -> None:
    """Called by the gateway for `GATEWAY_FLOWS=examples.webhook`."""
    types.register("webhook", webhook)
