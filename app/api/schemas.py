"""marshmallow schemas of the request bodies and query strings."""

from __future__ import annotations

import json
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from app.models import TaskStatus

METADATA_MAX_BYTES = 4096


def printable(value: str) -> None:
    if not value.isprintable():
        raise ValidationError("Must contain printable characters only.")


class WebhookSchema(Schema):
    class Meta:
        unknown = RAISE

    url = fields.String(required=True, validate=validate.Length(min=1, max=2048))


class SubmitTaskSchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(required=True, validate=validate.Length(min=1, max=100))
    input = fields.Raw(allow_none=True, load_default=None)
    webhook = fields.Nested(WebhookSchema, allow_none=True, load_default=None)
    idempotencyKey = fields.String(
        allow_none=True,
        load_default=None,
        validate=[validate.Length(min=1, max=255), printable],
    )
    metadata = fields.Dict(keys=fields.String(), allow_none=True, load_default=None)

    @validates("metadata")
    def _metadata_size(self, value: dict[str, Any] | None, **_: Any) -> None:
        if value is None:
            return
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > METADATA_MAX_BYTES:
            raise ValidationError(f"Must be at most {METADATA_MAX_BYTES} bytes as JSON ({size}).")


class ListTasksQuery(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf([s.value for s in TaskStatus]))
    type = fields.String(validate=validate.Length(max=100))
    idempotencyKey = fields.String(validate=validate.Length(min=1, max=255))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(validate=validate.Length(max=200))
