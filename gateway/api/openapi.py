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


def ops_document(settings: Settings) -> dict[str, Any]:
    """The document served at `GET /openapi.json` on the operators' listener."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tenant worker gateway operators' API",
            "version": "1",
            "description": "Metrics, health and readiness for operators; never the tenant port.",
        },
        "servers": [{"url": f"http://{settings.ops.host}:{settings.ops.port}"}],
        "components": {"schemas": _SCHEMAS},
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
