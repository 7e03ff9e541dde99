"""The OpenAPI 3.1 documents of the tenant API and of the operators' listener, written
by hand to match `gateway.api.tenant` and `gateway.api.ops`.

The request body schema is passed in from the model that validates it (`JobSubmission`),
so the two cannot drift; tests check that every route is documented and that real
answers validate against the documented schemas (schemathesis runs against both).
"""

from __future__ import annotations

from typing import Any

from gateway.records import Status
from gateway.settings import Settings

__all__ = ["ops_document", "tenant_document"]

_STATUSES = [s.value for s in Status]
_TERMINAL = ["succeeded", "failed", "cancelled", "timed_out", "rejected"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


_UNAUTHORIZED = {
    **_json("Error", "Missing or invalid API key."),
    "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
}
_NOT_FOUND = _json(
    "Error", "No such job for this tenant. Another tenant's job gets exactly this answer."
)
_JOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The job id (unique per tenant; may contain `/`).",
    "schema": {"type": "string", "minLength": 1},
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "Machine-readable code."},
            "detail": {"description": "Human-readable explanation, or validation errors."},
        },
    },
    "ValidationError": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "const": "invalid_body"},
            "detail": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["loc", "msg", "type"],
                            "properties": {
                                "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                                "msg": {"type": "string"},
                                "type": {"type": "string"},
                            },
                        },
                    },
                ]
            },
        },
    },
    "TypeNotAllowed": {
        "type": "object",
        "required": ["error", "detail", "allowed_types"],
        "properties": {
            "error": {"type": "string", "const": "type_not_allowed"},
            "detail": {"type": "string"},
            "allowed_types": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["id", "status"],
        "properties": {
            "id": {"type": "string"},
            "status": {
                "type": "string",
                "enum": _STATUSES,
                "description": "`queued` for a new job; a resubmitted id answers its "
                "current status and is not run again.",
            },
        },
    },
    "CancelAccepted": {
        "type": "object",
        "required": ["id", "status", "cancel"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": _STATUSES, "description": "Status when asked."},
            "cancel": {"type": "string", "const": "requested"},
        },
    },
    "AlreadyTerminal": {
        "type": "object",
        "required": ["error", "detail", "status"],
        "properties": {
            "error": {"type": "string", "const": "already_terminal"},
            "detail": {"type": "string"},
            "status": {"type": "string", "enum": _TERMINAL},
        },
    },
    "Job": {
        "type": "object",
        "required": ["id", "tenant", "status", "attempt", "at", "result"],
        "properties": {
            "id": {"type": "string"},
            "tenant": {"type": "string", "description": "The caller's own tenant."},
            "status": {"type": "string", "enum": _STATUSES},
            "attempt": {"type": "integer"},
            "at": {"type": "string", "description": "RFC 3339 time of this status."},
            "result": {
                "oneOf": [_ref("Result"), {"type": "null"}],
                "description": "The `jobs.results` record once terminal (null before, or "
                "when it is no longer cached).",
            },
        },
    },
    "Result": {
        "type": "object",
        "description": "A `jobs.results` record.",
        "required": [
            "id",
            "tenant",
            "type",
            "status",
            "result",
            "error",
            "attempts",
            "started_at",
            "finished_at",
            "duration_ms",
        ],
        "properties": {
            "id": {"type": "string"},
            "tenant": {"type": "string"},
            "type": {"type": ["string", "null"]},
            "status": {"type": "string", "enum": _TERMINAL},
            "result": {},
            "error": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    },
                ]
            },
            "attempts": {"type": "integer"},
            "started_at": {"type": "string"},
            "finished_at": {"type": "string"},
            "duration_ms": {"type": "number"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "const": "ok"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "reasons"],
        "properties": {
            "ready": {"type": "boolean"},
            "reasons": {"type": "array", "items": {"type": "string"}},
        },
    },
}


_HEALTH_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": {
            "operationId": "health",
            "summary": "The process is alive.",
            "responses": {"200": _json("Health", "Alive.")},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "ready",
            "summary": "Ready to serve: partitions assigned, views caught up, secrets reachable.",
            "responses": {
                "200": _json("Readiness", "Ready."),
                "503": _json("Readiness", "Not ready, with the reasons."),
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1 document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
}


_ADMIN_SCHEMAS: dict[str, Any] = {
    "TenantRow": {
        "type": "object",
        "required": ["tenant", "state", "quota", "running", "queued", "deferred", "throttled"],
        "properties": {
            "tenant": {"type": "string"},
            "state": {"enum": ["active", "paused"]},
            "quota": {"type": "object"},
            "running": {"type": "integer"},
            "queued": {"type": "integer"},
            "deferred": {"type": "integer"},
            "parked": {"type": "integer"},
            "throttled": {"type": "integer"},
            "backlog": {"type": "integer"},
            "share": {
                "type": "object",
                "description": "This replica's share of the quota now (gateway.shares).",
                "properties": {
                    "max_concurrency": {"type": "integer"},
                    "rate_per_s": {"type": "number"},
                },
            },
            "cluster": {
                "type": "object",
                "description": (
                    "The tenant's jobs waiting (buffered or parked) and running on every"
                    " replica heard from, from their demand reports (about 0.5 s old)."
                ),
                "properties": {
                    "replicas": {"type": "integer"},
                    "waiting": {"type": "integer"},
                    "running": {"type": "integer"},
                },
            },
        },
    },
    "Tenants": {
        "type": "object",
        "required": ["replica", "tenants"],
        "properties": {
            "replica": {"type": "string"},
            "tenants": {"type": "array", "items": _ref("TenantRow")},
        },
    },
    "TenantState": {
        "type": "object",
        "required": ["tenant", "state"],
        "properties": {"tenant": {"type": "string"}, "state": {"enum": ["active", "paused"]}},
    },
    "CancelAll": {
        "type": "object",
        "required": ["tenant"],
        "additionalProperties": False,
        "properties": {
            "tenant": {"type": "string", "minLength": 1, "maxLength": 63},
            "type": {"type": ["string", "null"], "minLength": 1, "maxLength": 200},
        },
    },
    "CancelAllAccepted": {
        "type": "object",
        "required": ["requested"],
        "properties": {"requested": {"type": "integer", "minimum": 0}},
    },
    "DlqEntry": {
        "type": "object",
        "required": ["partition", "offset", "reason", "detail", "source", "size", "time"],
        "properties": {
            "partition": {"type": "integer"},
            "offset": {"type": "integer"},
            "tenant": {"type": ["string", "null"]},
            "job_id": {"type": ["string", "null"]},
            "reason": {"type": "string"},
            "detail": {"type": "string"},
            "source": {"type": "object"},
            "size": {"type": "integer"},
            "time": {"type": "string"},
            "preview": {"type": "string", "description": "The value, cut at 1 KiB."},
            "truncated": {"type": "boolean"},
            "redriven": {"type": "boolean"},
        },
    },
    "DlqPage": {
        "type": "object",
        "required": ["entries", "next_cursor"],
        "properties": {
            "entries": {"type": "array", "items": _ref("DlqEntry")},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "Redrive": {
        "type": "object",
        "required": ["max"],
        "additionalProperties": False,
        "properties": {
            "tenant": {"type": ["string", "null"], "minLength": 1, "maxLength": 63},
            "reason": {"type": ["string", "null"], "minLength": 1, "maxLength": 64},
            "ids": {
                "type": ["array", "null"],
                "items": {"type": "string", "minLength": 1, "maxLength": 200},
                "maxItems": 10000,
            },
            "max": {"type": "integer", "minimum": 1, "maximum": 100000},
            "rate_per_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
            "dry_run": {"type": "boolean"},
        },
    },
    "RedriveAccepted": {
        "type": "object",
        "required": ["matched", "redriven", "already_redriven", "not_redrivable", "dry_run"],
        "properties": {
            "matched": {"type": "integer"},
            "redriven": {"type": "integer"},
            "already_redriven": {"type": "integer"},
            "not_redrivable": {"type": "integer"},
            "dry_run": {"type": "boolean"},
        },
    },
}

_OPERATOR = {
    **_json("Error", "Missing or invalid operator token."),
    "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
}
_TENANT_PARAM = {
    "name": "tenant",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}
_NO_TENANT = _json("Error", "No such tenant in the catalog.")
_UNSENT = _json("Error", "The broker did not take the command; retry.")


def _admin_paths() -> dict[str, Any]:
    secured: list[dict[str, list[str]]] = [{"operator": []}]

    def state(op: str) -> dict[str, Any]:
        return {
            "post": {
                "operationId": f"{op}Tenant",
                "summary": f"{op.capitalize()} a tenant on every replica.",
                "security": secured,
                "parameters": [_TENANT_PARAM],
                "responses": {
                    "202": _json("TenantState", "Sent to jobs.control."),
                    "401": _OPERATOR,
                    "404": _NO_TENANT,
                    "503": _UNSENT,
                },
            }
        }

    return {
        "/admin/v1/tenants": {
            "get": {
                "operationId": "listTenants",
                "summary": "Each tenant's state, quota and load on this replica.",
                "security": secured,
                "responses": {
                    "200": _json("Tenants", "Tenants."),
                    "401": _OPERATOR,
                    "503": _json("Error", "The gateway process did not answer."),
                },
            }
        },
        "/admin/v1/tenants/{tenant}/pause": state("pause"),
        "/admin/v1/tenants/{tenant}/resume": state("resume"),
        "/admin/v1/jobs/cancel": {
            "post": {
                "operationId": "cancelTenantJobs",
                "summary": "Cancel a tenant's queued, delayed and running jobs (of a type).",
                "security": secured,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CancelAll")}},
                },
                "responses": {
                    "202": _json("CancelAllAccepted", "Sent to jobs.control."),
                    "401": _OPERATOR,
                    "404": _NO_TENANT,
                    "422": _json("ValidationError", "Invalid body."),
                    "503": _UNSENT,
                },
            }
        },
        "/admin/v1/dlq": {
            "get": {
                "operationId": "listDlq",
                "summary": "DLQ entries matching a filter, a page at a time.",
                "security": secured,
                "parameters": [
                    {"name": "tenant", "in": "query", "schema": {"type": "string"}},
                    {"name": "reason", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _json("DlqPage", "A page of entries and the next page's cursor."),
                    "400": _json("Error", "Bad limit or cursor."),
                    "401": _OPERATOR,
                },
            }
        },
        "/admin/v1/dlq/redrive": {
            "post": {
                "operationId": "redriveDlq",
                "summary": "Send matching DLQ records back to jobs, paced, each at most once.",
                "security": secured,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Redrive")}},
                },
                "responses": {
                    "202": _json("RedriveAccepted", "Started (or counted, for a dry run)."),
                    "401": _OPERATOR,
                    "422": _json("ValidationError", "Invalid body."),
                },
            }
        },
    }


def ops_document(settings: Settings, *, admin: bool) -> dict[str, Any]:
    """The document served at `GET /openapi.json` on the operators' listener (the admin
    paths only when an operator token is configured)."""
    components: dict[str, Any] = {"schemas": {**_SCHEMAS, **_ADMIN_SCHEMAS}}
    if admin:
        components["securitySchemes"] = {"operator": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tenant worker gateway operators' API",
            "version": "1",
            "description": "Metrics, health, readiness and the admin API for operators; "
            "never the tenant port. Admin calls need `Authorization: Bearer "
            "<GATEWAY_OPS__TOKEN>`.",
        },
        "servers": [{"url": f"http://{settings.ops.host}:{settings.ops.port}"}],
        "components": components,
        "paths": {
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (text exposition format).",
                    "responses": {
                        "200": {
                            "description": "Metrics.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "503": _json("Error", "The gateway process did not answer."),
                    },
                }
            },
            **_HEALTH_PATHS,
            **(_admin_paths() if admin else {}),
        },
    }


def tenant_document(settings: Settings, submission_schema: dict[str, Any]) -> dict[str, Any]:
    """The document served at `GET /openapi.json`, given the request body's JSON Schema."""
    limit = settings.http.max_body_bytes
    submission = dict(submission_schema)
    submission["description"] = (
        "A `tenant` field is refused (422): the tenant is whoever owns the API key."
    )
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tenant worker gateway control API",
            "version": "1",
            "description": "Submit, inspect and cancel your own jobs. Every /v1 call needs "
            "`Authorization: Bearer <api key>`; the key decides the tenant.",
        },
        "servers": [{"url": f"http://{settings.http.host}:{settings.http.port}"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {**_SCHEMAS, "JobSubmission": submission},
        },
        "paths": {
            "/v1/jobs": {
                "post": {
                    "operationId": "submitJob",
                    "summary": "Queue a job for the caller's tenant.",
                    "security": secured,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("JobSubmission")}},
                    },
                    "responses": {
                        "202": _json("Accepted", "Queued (produced to `jobs`)."),
                        "400": _json("TypeNotAllowed", "Unknown or not-allowed job type."),
                        "401": _UNAUTHORIZED,
                        "413": _json(
                            "Error", f"Body over {limit} bytes, or the job over the payload limit."
                        ),
                        "422": _json("ValidationError", "Invalid body."),
                        "429": {
                            **_json("Error", "Too many submissions for this tenant; retry."),
                            "headers": {
                                "Retry-After": {
                                    "description": "Seconds to wait.",
                                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                                }
                            },
                        },
                        "503": _json("Error", "The broker did not take the job; retry."),
                    },
                }
            },
            "/v1/jobs/{id}": {
                "get": {
                    "operationId": "getJob",
                    "summary": "Latest status and, once terminal, the result record.",
                    "security": secured,
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": _json("Job", "The job."),
                        "401": _UNAUTHORIZED,
                        "404": _NOT_FOUND,
                    },
                }
            },
            "/v1/jobs/{id}/cancel": {
                "post": {
                    "operationId": "cancelJob",
                    "summary": "Cancel a job that is not terminal yet.",
                    "security": secured,
                    "parameters": [_JOB_ID],
                    "responses": {
                        "202": _json("CancelAccepted", "Cancel sent to `jobs.control`."),
                        "401": _UNAUTHORIZED,
                        "404": _NOT_FOUND,
                        "409": _json("AlreadyTerminal", "The job is already terminal."),
                        "503": _json("Error", "The broker did not take the command; retry."),
                    },
                }
            },
            **_HEALTH_PATHS,
        },
    }
