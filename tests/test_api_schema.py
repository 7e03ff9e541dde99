"""Schemathesis against the served OpenAPI document: generated requests, valid and not
(positive and negative generation),
to a real `gateway run` process (its API process) and a real Tansu broker.

Every answer must be one the document lists for the operation, with the documented
content type and body schema, and never a 5xx.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from gateway.dev.services import Tansu
from gateway.service import ensure_topics

from conftest import GatewayProcess, make_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUTH = {"Authorization": "Bearer demo-key-acme"}  # the shipped example tenant's key
OPS_TOKEN = "schema-test-operator-token"
OPS_AUTH = {"Authorization": f"Bearer {OPS_TOKEN}"}


@pytest.fixture(scope="module")
def api_schema(
    tansu: Tansu, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[schemathesis.BaseSchema]:
    made = make_settings(tansu.bootstrap)
    asyncio.run(ensure_topics(made.kafka, made.topics))
    log_path: Path = tmp_path_factory.mktemp("schema") / "gateway.log"
    process = GatewayProcess(
        made,
        log_path,
        GATEWAY_HTTP__ENABLED="true",
        GATEWAY_HTTP__PORT="0",
        GATEWAY_OPS__ENABLED="true",
        GATEWAY_OPS__PORT="0",
        GATEWAY_OPS__TOKEN=OPS_TOKEN,
    )
    process.start()
    try:
        port = _wait_ready(process, "http_started")
        ops_port = _wait_ready(process, "ops_started")
        yield (
            schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json"),
            schemathesis.openapi.from_url(f"http://127.0.0.1:{ops_port}/openapi.json"),
        )
    finally:
        process.kill()


def _wait_ready(process: GatewayProcess, event: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        port = next(
            (int(x["port"]) for x in process.log_lines() if x.get("event") == event),
            None,
        )
        if port is not None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    return port
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    pytest.fail("gateway not ready")


def _exercise(
    operation: Any,
    mode: schemathesis.GenerationMode,
    headers: dict[str, str] = AUTH,
    examples: int = 40,
) -> int:
    """One Hypothesis run of generated cases for one operation; returns how many ran."""
    calls = 0

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def conforms(case: schemathesis.Case) -> None:
        nonlocal calls
        # Every check but one: a schema-valid job type can still be unknown or not in
        # the tenant's allowed types, and the contract answers that with 400.
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])
        calls += 1

    conforms()
    return calls


def test_answers_conform_to_the_document(api_schema: Any) -> None:
    # schemathesis's own pytest plugin does not run under pytest 9 (it reads a private
    # attribute pytest dropped); its strategies do, one Hypothesis run per operation.
    tenant_schema, _ = api_schema
    operations = [result.ok() for result in tenant_schema.get_all_operations()]
    jobs = {"POST /v1/jobs", "GET /v1/jobs/{id}", "POST /v1/jobs/{id}/cancel"}
    assert {op.label for op in operations} >= jobs
    calls = {}
    for operation in operations:
        calls[operation.label] = _exercise(operation, schemathesis.GenerationMode.POSITIVE)
        if operation.label in jobs:  # the others take no input to get wrong
            negative = _exercise(operation, schemathesis.GenerationMode.NEGATIVE)
            calls[f"{operation.label} (invalid)"] = negative
    print(calls)
    # Not vacuous: every operation was called, the job operations many times each way.
    assert all(calls.values())
    assert min(n for label, n in calls.items() if "/v1/" in label) >= 20


def test_operator_answers_conform_to_their_document(api_schema: Any) -> None:
    _, ops_schema = api_schema
    operations = [result.ok() for result in ops_schema.get_all_operations()]
    admin = {op.label for op in operations if "/admin/" in op.label}
    assert {"POST /admin/v1/dlq/redrive", "GET /admin/v1/tenants"} <= admin
    calls = {}
    for operation in operations:
        # Fewer examples: each DLQ call reads the whole (small) DLQ topic.
        calls[operation.label] = _exercise(
            operation, schemathesis.GenerationMode.POSITIVE, OPS_AUTH, examples=15
        )
        if operation.label in admin:
            negative = _exercise(
                operation, schemathesis.GenerationMode.NEGATIVE, OPS_AUTH, examples=15
            )
            calls[f"{operation.label} (invalid)"] = negative
    print(calls)
    assert all(calls.values())
