"""The OpenAPI 3 document, generated from the marshmallow schemas the API uses
and from the task-type registry, and the ``/docs`` page that renders it.

The document stays on OpenAPI 3.0.3: the pinned Swagger UI that ``/docs``
serves (the ``swagger-ui-bundle`` package, Swagger UI 4.x) renders 3.0 only.
"""

from __future__ import annotations

import copy
import html
import json
import re
from functools import cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin, OpenAPIConverter
from flask import Blueprint, Response, abort, jsonify, send_from_directory, url_for
from marshmallow import Schema, fields
from swagger_ui_bundle import swagger_ui_path

from app.api import schemas
from app.services.task_types import Registry, TaskType

bp = Blueprint("openapi", __name__)

# The only value of a null-only schema. OpenAPI 3.0.3 makes ``nullable``
# meaningful only beside a ``type`` in the same schema object, so null is
# spelled as a typed, nullable schema whose one allowed value is null. (A bare
# ``{"allOf": [{"$ref": ...}], "nullable": true}`` does *not* admit null under
# 3.0.3's rules, and openapi-core's validator rejects ``"webhook": null`` there.)
NULL: dict[str, Any] = {"type": "object", "nullable": True, "enum": [None]}


class _Converter(OpenAPIConverter):
    def field2nullable(self, field: fields.Field, ret: dict[str, Any]) -> dict[str, Any]:
        """A nullable Nested field: its schema's reference, or null; nothing else.

        apispec renders it as ``anyOf: [{"type": "object", "nullable": true}, ref]``
        whose first branch accepts any object, so generated clients got an
        untyped dict and ``{"webhook": {"foo": 1}}`` validated.
        """
        if field.allow_none and self.openapi_version.major == 3 and self.openapi_version.minor == 0:
            if "$ref" in ret:
                return {"anyOf": [{"$ref": ret.pop("$ref")}, NULL]}
            if "allOf" in ret:
                return {"anyOf": [*ret.pop("allOf"), NULL]}
        attributes: dict[str, Any] = super().field2nullable(field, ret)
        return attributes


class _Plugin(MarshmallowPlugin):
    Converter = _Converter


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str, **headers: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }
    if headers:
        out["headers"] = headers
    return out


def _json(schema: dict[str, Any], description: str, **headers: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


RETRY_AFTER = {"required": True, "schema": {"type": "integer", "minimum": 0}, "description": "seconds"}
WWW_AUTHENTICATE = {"required": True, "schema": {"type": "string"}, "description": 'Bearer realm="waybill"'}
LOCATION = {"required": True, "schema": {"type": "string"}, "description": "/v1/tasks/{taskId}"}
PREFERENCE_APPLIED = {"schema": {"type": "string"}, "description": "wait=N when the wait was applied"}
NOT_FOUND = {"404": _problem("No such task for this organization")}
TASK_ID = {"name": "taskId", "in": "path", "required": True, "schema": {"type": "string"}}
PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "example": "wait=10"},
    "description": "wait=N (N <= 60): hold the response until the task is final or N seconds pass.",
}
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "the id of the last event received: the stream goes on after it",
}
CANCEL_AFTER = {
    "name": "Cancel-After",
    "in": "header",
    "required": False,
    "schema": {
        "type": "string",
        "maxLength": 32,
        "pattern": "^([0-9]+|([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?)$",
        "example": "15m",
    },
    "description": (
        "(1.1) An alias of the body's cancelAfter: seconds (`90`) or a duration (`90s`, `15m`, `2h`, "
        "`1h30m`, `7d`), 1 s to 7 days; both and different: 400."
    ),
}
NUL_IN_QUERY = "a query string value contains U+0000 (the problem's `errors` names the parameter)"
AUTH_LIMITED = "too many failed authentications from this address (unauthenticated requests only)"


def _v1(
    operation: dict[str, Any], bad_request: str | None = None, too_many: str | None = None
) -> dict[str, Any]:
    """A ``/v1`` operation: bearer-authenticated, and every one may answer 400, 401 and 429.

    400: a query string value holding U+0000 is refused before any route
    runs; 429: the failed-authentication limiter answers for any route.
    """
    reasons_400 = f"{bad_request}, or {NUL_IN_QUERY}" if bad_request else NUL_IN_QUERY.capitalize()
    reasons_429 = f"{too_many}, or {AUTH_LIMITED}" if too_many else AUTH_LIMITED.capitalize()
    responses = {
        **operation.pop("responses"),
        "400": _problem(reasons_400),
        "401": _problem("Missing, unknown or revoked API key", **{"WWW-Authenticate": WWW_AUTHENTICATE}),
        "429": _problem(reasons_429, **{"Retry-After": RETRY_AFTER}),
    }
    return {**operation, "security": [{"bearer": []}], "responses": dict(sorted(responses.items()))}


def _pascal(name: str) -> str:
    """``http.fetch`` -> ``HttpFetch``: a component name from a task-type name."""
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[^0-9A-Za-z]+", name) if p) or "Task"


def _plain(prop: dict[str, Any]) -> dict[str, Any]:
    """A field's schema without the body-only ``default: null``/``nullable`` of a load default."""
    return {k: v for k, v in prop.items() if k not in ("default", "nullable")}


def _submission_variants(spec: APISpec, converter: OpenAPIConverter, registry: Registry) -> dict[str, Any]:
    """``SubmitTask`` as one variant per task type, told apart by ``type``.

    Each variant is the whole ``SubmitTaskSchema`` (flattened rather than
    ``allOf``-composed: its ``additionalProperties: false`` would refuse the
    other half) with ``type`` fixed and ``input`` that type's own schema.
    """
    base = converter.schema2jsonschema(schemas.SubmitTaskSchema)
    types: list[TaskType] = list(registry)
    if not types:
        return dict(base)
    mapping: dict[str, str] = {}
    taken: set[str] = set()
    for task_type in types:
        stem = _pascal(task_type.name)
        while stem in taken:  # two type names that differ only in punctuation
            stem += "_"
        taken.add(stem)
        variant = copy.deepcopy(base)
        variant["properties"]["type"] = {
            "type": "string",
            "enum": [task_type.name],
            "description": f"{task_type.description} Cost: {task_type.cost} credit(s).",
        }
        input_schema = task_type.json_schema()
        if task_type.input_schema is None:
            variant["properties"]["input"] = {"nullable": True, "description": "Any JSON value."}
        else:
            spec.components.schema(f"{stem}Input", component=input_schema)
            if input_schema.get("required"):
                # Omitted or null, the input is validated as {} and refused.
                variant["properties"]["input"] = _ref(f"{stem}Input")
                variant["required"] = [*variant.get("required", []), "input"]
            else:
                variant["properties"]["input"] = {"anyOf": [_ref(f"{stem}Input"), NULL]}
        name = f"Submit{stem}Task"
        spec.components.schema(name, component=variant)
        mapping[task_type.name] = _ref(name)["$ref"]
    return {
        "description": "A task submission; `type` selects the variant and so the schema of `input`.",
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "type", "mapping": mapping},
    }


def _batch_components(spec: APISpec) -> None:
    """The batch's request (``SubmitTask`` items) and its answer (one entry per item, either kind)."""
    spec.components.schema(
        "SubmitTaskBatch",
        component={
            "type": "object",
            "additionalProperties": False,
            "required": ["tasks"],
            "properties": {
                "tasks": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": schemas.BATCH_MAX_TASKS,
                    "items": _ref("SubmitTask"),
                    "description": (
                        "Each item exactly the body of `POST /v1/tasks`. An item that is not valid is "
                        "answered in its own entry (400), not by refusing the batch."
                    ),
                }
            },
        },
    )
    spec.components.schema(
        "TaskBatchResult",
        component={
            "type": "object",
            "additionalProperties": False,
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "array",
                    "items": {"oneOf": [_ref("BatchTaskEntry"), _ref("BatchProblemEntry")]},
                    "description": "One entry per item of the batch, in item order.",
                }
            },
        },
    )


@cache
def build_spec() -> dict[str, Any]:
    plugin = _Plugin()
    spec = APISpec(
        title="Waybill",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "Async requests: submit a task, poll it or receive it on a signed webhook."},
        servers=[{"url": "/"}],
    )
    assert plugin.converter is not None
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme(
        "metricsToken",
        {"type": "http", "scheme": "bearer", "description": "METRICS_TOKEN, when the operator sets one"},
    )
    components: tuple[tuple[str, type[Schema]], ...] = (
        ("Task", schemas.TaskSchema),
        ("TaskList", schemas.TaskListSchema),
        ("Problem", schemas.ProblemSchema),
        ("BatchTaskEntry", schemas.BatchTaskEntrySchema),
        ("BatchProblemEntry", schemas.BatchProblemEntrySchema),
        ("Organization", schemas.OrganizationSchema),
        ("TaskType", schemas.TaskTypeSchema),
        ("WebhookSecret", schemas.WebhookSecretSchema),
        ("DeliveryList", schemas.DeliveryListSchema),
        ("RedeliverFailed", schemas.RedeliverFailedSchema),
        ("RedeliverCount", schemas.RedeliverCountSchema),
        ("Health", schemas.HealthSchema),
    )
    for name, component in components:
        spec.components.schema(name, schema=component)
    # The entry points' types: the registry create_app builds by default.
    spec.components.schema(
        "SubmitTask", component=_submission_variants(spec, plugin.converter, Registry.from_entry_points())
    )
    _batch_components(spec)
    key_field = schemas.SubmitTaskSchema().fields["idempotencyKey"]
    spec.path(
        path="/v1/tasks",
        operations={
            "post": _v1(
                {
                    "summary": "Submit a task",
                    "operationId": "submitTask",
                    "parameters": [
                        PREFER,
                        CANCEL_AFTER,
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": _plain(plugin.converter.field2property(key_field)),
                            "description": "An alias of the body's idempotencyKey; both and different: 400.",
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": "SubmitTask"}},
                    },
                    "responses": {
                        "202": _json(_ref("Task"), "Accepted: the task, queued", Location=LOCATION),
                        "200": _json(
                            _ref("Task"),
                            "An idempotent replay (Idempotent-Replayed: true), "
                            "or finished within Prefer: wait",
                            **{
                                "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}},
                                "Location": LOCATION,
                                "Preference-Applied": PREFERENCE_APPLIED,
                            },
                        ),
                        "402": _problem("Not enough credits for the task (`balance` and `cost`)"),
                        "413": _problem("Body over the size limit"),
                        "415": _problem("Not JSON"),
                        "422": _problem("The idempotency key was used with a different request"),
                    },
                },
                bad_request=(
                    "Invalid body, unknown type, bad input, bad URL, or a bad or conflicting "
                    "Cancel-After or Idempotency-Key header (`errors` names the fields)"
                ),
                too_many="The organization's queue is full (`queued` and `queueLimit`)",
            ),
            "get": _v1(
                {
                    "summary": "List tasks, newest first",
                    "operationId": "listTasks",
                    # Expanded by apispec into one query parameter per field,
                    # with the constraints the route enforces.
                    "parameters": [{"in": "query", "schema": schemas.ListTasksQuery}],
                    "responses": {"200": _json(_ref("TaskList"), "A page of tasks")},
                },
                bad_request="A query parameter is unknown or out of range",
            ),
        },
    )
    spec.path(
        path="/v1/tasks/batch",
        operations={
            "post": _v1(
                {
                    "summary": "Submit many tasks at once",
                    "description": (
                        "Each item is judged as `POST /v1/tasks` would judge it alone, in item order "
                        "(validation, idempotency key, credits, queue limit); the accepted ones are "
                        "committed together. One entry per item, in item order: its status and the "
                        "task, or its status and the problem the single submission would have "
                        "answered. A key used by an earlier accepted item of the batch is a replay of "
                        "that item's task (200), or 422 for a different request. `Prefer: wait` does "
                        "not apply, and the `Idempotency-Key` header is refused (400). A `Cancel-After` "
                        "header applies to every item, as if each were submitted alone with it (an "
                        "item whose `cancelAfter` differs is that item's 400)."
                    ),
                    "operationId": "submitTaskBatch",
                    "parameters": [
                        {
                            **CANCEL_AFTER,
                            "description": "(1.1) The cancelAfter of every item; malformed: 400.",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("SubmitTaskBatch")}},
                    },
                    "responses": {
                        "200": _json(_ref("TaskBatchResult"), "One entry per item, in item order"),
                        "413": _problem("Body over the size limit"),
                        "415": _problem("Not JSON"),
                    },
                },
                bad_request=(
                    'Not `{"tasks": [...]}` with 1 to 1,000 items (`errors` names the field), '
                    "an Idempotency-Key header, or a malformed Cancel-After header"
                ),
            )
        },
    )
    spec.path(
        path="/v1/tasks/{taskId}",
        operations={
            "get": _v1(
                {
                    "summary": "Poll a task",
                    "operationId": "getTask",
                    "parameters": [TASK_ID, PREFER],
                    "responses": {
                        "200": _json(_ref("Task"), "The task", **{"Preference-Applied": PREFERENCE_APPLIED}),
                        **NOT_FOUND,
                    },
                }
            )
        },
    )
    spec.path(
        path="/v1/tasks/{taskId}/events",
        operations={
            "get": _v1(
                {
                    "summary": "(1.1) The task's events as Server-Sent Events: history, then live",
                    "description": (
                        "`text/event-stream`: each event has `id:` (increasing per task), `event:` "
                        "(task.queued, task.started, task.progress, task.succeeded, task.failed, "
                        "task.canceled) and `data:` the task representation at that moment; comment "
                        "lines keep an idle stream alive; the stream ends after the final event."
                    ),
                    "operationId": "streamTaskEvents",
                    "parameters": [TASK_ID, LAST_EVENT_ID],
                    "responses": {
                        "200": {
                            "description": "The event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **NOT_FOUND,
                        "503": _problem(
                            "This server process serves as many event streams as it may; retry later",
                            **{"Retry-After": RETRY_AFTER},
                        ),
                    },
                }
            )
        },
    )
    spec.path(
        path="/v1/tasks/{taskId}/cancel",
        operations={
            "post": _v1(
                {
                    "summary": "Cancel a queued or running task",
                    "operationId": "cancelTask",
                    "parameters": [TASK_ID],
                    "responses": {
                        "200": _json(_ref("Task"), "The task, now canceled"),
                        **NOT_FOUND,
                        "409": _problem("The task is already succeeded, failed or canceled"),
                    },
                }
            )
        },
    )
    spec.path(
        path="/v1/tasks/{taskId}/deliveries",
        operations={
            "get": _v1(
                {
                    "summary": "Every webhook event of the task with every attempt",
                    "operationId": "listDeliveries",
                    "parameters": [TASK_ID],
                    "responses": {"200": _json(_ref("DeliveryList"), "The deliveries"), **NOT_FOUND},
                }
            ),
            "post": _v1(
                {
                    "summary": "Deliver the task's events again now, with the same webhook-id",
                    "operationId": "redeliver",
                    "parameters": [TASK_ID],
                    "responses": {
                        "202": _json(_ref("DeliveryList"), "Redelivery scheduled"),
                        **NOT_FOUND,
                        "409": _problem("The task has no webhook event yet"),
                    },
                }
            ),
        },
    )
    spec.path(
        path="/v1/deliveries/redeliver",
        operations={
            "post": _v1(
                {
                    "summary": "(1.1) Deliver again the failed deliveries since a time, to any or one host",
                    "description": (
                        "Each failed delivery of the organization created at or after `since` (and to "
                        "`host`) becomes pending again with one more attempt and its webhook-id; at most "
                        "10,000 per call, the rest stay failed for the next call."
                    ),
                    "operationId": "redeliverFailed",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("RedeliverFailed")}},
                    },
                    "responses": {
                        "202": _json(_ref("RedeliverCount"), "The deliveries queued again"),
                        "413": _problem("Body over the size limit"),
                        "415": _problem("Not JSON"),
                    },
                },
                bad_request='Not `{"since": <RFC 3339>, "host"?}` (`errors` names the field)',
            )
        },
    )
    # Operations with one 200 answer and nothing else of their own.
    simple: tuple[tuple[str, str, str, str, dict[str, Any]], ...] = (
        (
            "get",
            "/v1/organization",
            "getOrganization",
            "The organization, its credits and limits",
            _ref("Organization"),
        ),
        (
            "get",
            "/v1/task-types",
            "listTaskTypes",
            "The registered task types",
            {"type": "array", "items": _ref("TaskType")},
        ),
        (
            "get",
            "/v1/webhook-secret",
            "getWebhookSecret",
            "The webhook signing secret",
            _ref("WebhookSecret"),
        ),
        (
            "post",
            "/v1/webhook-secret/rotate",
            "rotateWebhookSecret",
            "Rotate the signing secret (the old one also signs for 24 h)",
            _ref("WebhookSecret"),
        ),
        ("get", "/healthz", "healthz", "Process up", _ref("Health")),
    )
    for method, path, op_id, summary, schema in simple:
        operation = {"summary": summary, "operationId": op_id, "responses": {"200": _json(schema, summary)}}
        spec.path(path=path, operations={method: _v1(operation) if path.startswith("/v1/") else operation})
    spec.path(
        path="/readyz",
        operations={
            "get": {
                "summary": "Database and broker reachable",
                "operationId": "readyz",
                "responses": {
                    "200": _json(_ref("Health"), "Ready"),
                    "503": _json(_ref("Health"), "Not ready"),
                },
            }
        },
    )
    spec.path(
        path="/metrics",
        operations={
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                # {}: no credentials needed unless the operator sets METRICS_TOKEN.
                "security": [{}, {"metricsToken": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _problem(
                        "METRICS_TOKEN is set and the request lacks `Authorization: Bearer <token>`"
                    ),
                },
            }
        },
    )
    return spec.to_dict()


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(build_spec())


# Swagger UI's own files, from the pinned swagger-ui-bundle package: /docs
# works offline and shows the same UI whatever a CDN's "latest" becomes.
DOCS_ASSETS = frozenset(
    {
        "swagger-ui.css",
        "swagger-ui.css.map",
        "swagger-ui-bundle.js",
        "swagger-ui-bundle.js.map",
        "favicon-16x16.png",
        "favicon-32x32.png",
    }
)

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Waybill API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="{css}">
<link rel="icon" type="image/png" href="{icon}" sizes="32x32">
</head>
<body><div id="swagger-ui"></div>
<noscript>The API document is at <a href="{spec}">{spec}</a>.</noscript>
<script src="{js}"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: {spec_js},
  dom_id: "#swagger-ui",
  deepLinking: true,
  // null: no badge fetched from the public validator service
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
}});
</script>
</body></html>"""


@bp.get("/docs")
def docs() -> Response:
    spec_url = url_for("openapi.openapi_json")
    page = DOCS_PAGE.format(
        css=html.escape(url_for("openapi.docs_static", filename="swagger-ui.css")),
        icon=html.escape(url_for("openapi.docs_static", filename="favicon-32x32.png")),
        js=html.escape(url_for("openapi.docs_static", filename="swagger-ui-bundle.js")),
        spec=html.escape(spec_url),
        # JSON is a JS string literal; </ escaped so it cannot close the script.
        spec_js=json.dumps(spec_url).replace("</", "<\\/"),
    )
    return Response(page, mimetype="text/html")


@bp.get("/docs/static/<path:filename>")
def docs_static(filename: str) -> Response:
    if filename not in DOCS_ASSETS:
        abort(404)
    return send_from_directory(str(swagger_ui_path), filename)
