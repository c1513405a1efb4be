"""The OpenAPI 3 document, generated from the marshmallow schemas the API uses."""

from __future__ import annotations

from functools import cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, jsonify
from marshmallow import Schema

from app.api import schemas

bp = Blueprint("openapi", __name__)

PROBLEM = {"application/problem+json": {"schema": "Problem"}}


def _problem(description: str, **headers: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": PROBLEM}
    if headers:
        out["headers"] = headers
    return out


def _json(schema: str | dict[str, Any], description: str, **headers: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


AUTH_ERRORS = {"401": _problem("Missing, unknown or revoked API key")}
NOT_FOUND = {"404": _problem("No such task for this organization")}
TASK_ID = {"name": "taskId", "in": "path", "required": True, "schema": {"type": "string"}}
PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "example": "wait=10"},
    "description": "wait=N (N <= 60): hold the response until the task is final or N seconds pass.",
}
PREFERENCE_APPLIED = {"schema": {"type": "string"}, "description": "wait=N when the wait was applied"}
LOCATION = {"schema": {"type": "string"}, "description": "/v1/tasks/{taskId}"}


@cache
def build_spec() -> dict[str, Any]:
    spec = APISpec(
        title="Waybill",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Async requests: submit a task, poll it or receive it on a signed webhook."},
        servers=[{"url": "/"}],
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    components: tuple[tuple[str, type[Schema]], ...] = (
        ("SubmitTask", schemas.SubmitTaskSchema),
        ("Task", schemas.TaskSchema),
        ("TaskList", schemas.TaskListSchema),
        ("Problem", schemas.ProblemSchema),
        ("Organization", schemas.OrganizationSchema),
        ("TaskType", schemas.TaskTypeSchema),
        ("WebhookSecret", schemas.WebhookSecretSchema),
        ("DeliveryList", schemas.DeliveryListSchema),
        ("Health", schemas.HealthSchema),
    )
    for name, component in components:
        spec.components.schema(name, schema=component)
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    spec.path(
        path="/v1/tasks",
        operations={
            "post": {
                "summary": "Submit a task",
                "operationId": "submitTask",
                "security": secured,
                "parameters": [
                    PREFER,
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": {"required": True, "content": {"application/json": {"schema": "SubmitTask"}}},
                "responses": {
                    "202": _json("Task", "Accepted: the task, queued", Location=LOCATION),
                    "200": _json(
                        "Task",
                        "An idempotent replay (Idempotent-Replayed: true), or finished within Prefer: wait",
                        **{
                            "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}},
                            "Location": LOCATION,
                            "Preference-Applied": PREFERENCE_APPLIED,
                        },
                    ),
                    "400": _problem("Invalid body, unknown type, bad input or bad URL"),
                    **AUTH_ERRORS,
                    "402": _problem("Not enough credits for the task"),
                    "413": _problem("Body over the size limit"),
                    "415": _problem("Not JSON"),
                    "422": _problem("The idempotency key was used with a different request"),
                    "429": _problem(
                        "The organization's queue is full",
                        **{"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
                    ),
                },
            },
            "get": {
                "summary": "List tasks, newest first",
                "operationId": "listTasks",
                "security": secured,
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": ["queued", "running", "succeeded", "failed", "canceled"],
                        },
                    },
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {"name": "idempotencyKey", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _json("TaskList", "A page of tasks"),
                    "400": _problem("Bad query"),
                    **AUTH_ERRORS,
                },
            },
        },
    )
    spec.path(
        path="/v1/tasks/{taskId}",
        operations={
            "get": {
                "summary": "Poll a task",
                "operationId": "getTask",
                "security": secured,
                "parameters": [TASK_ID, PREFER],
                "responses": {
                    "200": _json("Task", "The task", **{"Preference-Applied": PREFERENCE_APPLIED}),
                    **AUTH_ERRORS,
                    **NOT_FOUND,
                },
            }
        },
    )
    spec.path(
        path="/v1/tasks/{taskId}/cancel",
        operations={
            "post": {
                "summary": "Cancel a queued or running task",
                "operationId": "cancelTask",
                "security": secured,
                "parameters": [TASK_ID],
                "responses": {
                    "200": _json("Task", "The task, now canceled"),
                    **AUTH_ERRORS,
                    **NOT_FOUND,
                    "409": _problem("The task is already succeeded, failed or canceled"),
                },
            }
        },
    )
    spec.path(
        path="/v1/tasks/{taskId}/deliveries",
        operations={
            "get": {
                "summary": "Every webhook event of the task with every attempt",
                "operationId": "listDeliveries",
                "security": secured,
                "parameters": [TASK_ID],
                "responses": {"200": _json("DeliveryList", "The deliveries"), **AUTH_ERRORS, **NOT_FOUND},
            },
            "post": {
                "summary": "Deliver the task's events again now, with the same webhook-id",
                "operationId": "redeliver",
                "security": secured,
                "parameters": [TASK_ID],
                "responses": {
                    "202": _json("DeliveryList", "Redelivery scheduled"),
                    **AUTH_ERRORS,
                    **NOT_FOUND,
                    "409": _problem("The task has no webhook event yet"),
                },
            },
        },
    )
    simple: tuple[tuple[str, str, str, str | dict[str, Any]], ...] = (
        ("/v1/organization", "getOrganization", "The organization, its credits and limits", "Organization"),
        (
            "/v1/task-types",
            "listTaskTypes",
            "The registered task types",
            {"type": "array", "items": {"$ref": "#/components/schemas/TaskType"}},
        ),
        ("/v1/webhook-secret", "getWebhookSecret", "The webhook signing secret", "WebhookSecret"),
    )
    for path, op_id, summary, schema in simple:
        spec.path(
            path=path,
            operations={
                "get": {
                    "summary": summary,
                    "operationId": op_id,
                    "security": secured,
                    "responses": {"200": _json(schema, summary), **AUTH_ERRORS},
                }
            },
        )
    spec.path(
        path="/v1/webhook-secret/rotate",
        operations={
            "post": {
                "summary": "Rotate the signing secret (the old one also signs for 24 h)",
                "operationId": "rotateWebhookSecret",
                "security": secured,
                "responses": {"200": _json("WebhookSecret", "The new secret"), **AUTH_ERRORS},
            }
        },
    )
    spec.path(
        path="/healthz",
        operations={
            "get": {
                "summary": "Process up",
                "operationId": "healthz",
                "responses": {"200": _json("Health", "Up")},
            }
        },
    )
    spec.path(
        path="/readyz",
        operations={
            "get": {
                "summary": "Database and broker reachable",
                "operationId": "readyz",
                "responses": {"200": _json("Health", "Ready"), "503": _json("Health", "Not ready")},
            }
        },
    )
    spec.path(
        path="/metrics",
        operations={
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    )
    return spec.to_dict()


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(build_spec())


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Waybill API</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="https://cdn.redoc.ly/redoc/latest/bundles/redoc.standalone.js"></script>
<noscript>The API document is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>"""


@bp.get("/docs")
def docs() -> Response:
    return Response(DOCS_PAGE, mimetype="text/html")
