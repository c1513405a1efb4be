from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from app.services import outbound
from app.services.task_types import TaskContext, TaskError, TaskType

MAX_BODY_BYTES = 1024 * 1024
MAX_HEADERS = 50


def _http_url(value: str) -> None:
    try:
        outbound.parse_url(value)
    except outbound.UnsafeTarget as exc:
        raise ValidationError(str(exc)) from None


def _headers(value: dict[str, str]) -> None:
    if len(value) > MAX_HEADERS:
        raise ValidationError(f"At most {MAX_HEADERS} headers.")
    for name, v in value.items():
        if not name or any(c in name for c in ":\r\n ") or any(c in v for c in "\r\n\x00"):
            raise ValidationError(f"Header {name!r} is not a valid header.")
        if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
            raise ValidationError(f"Header {name!r} is set by Waybill.")


class FetchInput(Schema):
    class Meta:
        unknown = RAISE

    url = fields.String(required=True, validate=[validate.Length(max=2048), _http_url])
    method = fields.String(load_default="GET", validate=validate.OneOf(["GET", "HEAD"]))
    headers = fields.Dict(
        keys=fields.String(validate=validate.Length(max=100)),
        values=fields.String(validate=validate.Length(max=4096)),
        load_default=dict,
        validate=_headers,
    )
    timeoutSeconds = fields.Float(
        load_default=30.0, allow_nan=False, validate=validate.Range(min=0.1, max=120)
    )


def handle(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    try:
        response = outbound.request(
            task_input["method"],
            task_input["url"],
            headers=task_input["headers"],
            timeout=task_input["timeoutSeconds"],
            max_bytes=MAX_BODY_BYTES,
            allow_private=context.allow_private_targets,
        )
    except outbound.UnsafeTarget as exc:
        raise TaskError("target_refused", str(exc)) from None
    except outbound.OutboundError as exc:
        raise TaskError(f"fetch_{exc.kind}", str(exc)) from None
    headers: dict[str, str] = {}
    for name, value in response.headers:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return {
        "status": response.status,
        "headers": headers,
        # Text as a JSON result can hold it: invalid UTF-8 and U+0000 (which
        # PostgreSQL cannot store) become U+FFFD, the replacement character.
        "body": response.body.decode("utf-8", errors="replace").replace("\x00", "\ufffd"),
        "truncated": response.truncated,
        "elapsedMs": response.elapsed_ms,
    }


TASK_TYPE = TaskType(
    name="http.fetch",
    cost=2,
    description=(
        "Fetches a URL (GET or HEAD) and returns its status, headers and body text "
        "(at most 1 MiB). Redirects are not followed; private addresses are refused "
        "unless the operator allows them (FETCH_ALLOW_PRIVATE)."
    ),
    handler=handle,
    input_schema=FetchInput,
)
