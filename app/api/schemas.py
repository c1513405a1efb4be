"""marshmallow schemas of the request bodies and query strings."""

from __future__ import annotations

import json
import re
from typing import Any

from marshmallow import INCLUDE, RAISE, Schema, ValidationError, fields, validate, validates

from app.models import TaskStatus
from app.services.deliveries import EVENTS as WEBHOOK_EVENTS
from app.services.errors import ValidationFailed

METADATA_MAX_BYTES = 4096
CANCEL_AFTER_MAX = 604800  # seconds: 7 days
CANCEL_AFTER_RANGE = validate.Range(
    min=1, max=CANCEL_AFTER_MAX, error=f"Must be from 1 to {CANCEL_AFTER_MAX} seconds (7 days)."
)


def printable(value: str) -> None:
    if not value.isprintable():
        raise ValidationError("Must contain printable characters only.")


class WebhookSchema(Schema):
    class Meta:
        unknown = RAISE

    url = fields.String(required=True, validate=validate.Length(min=1, max=2048))
    events = fields.List(
        fields.String(validate=validate.OneOf(WEBHOOK_EVENTS)),
        allow_none=True,
        load_default=None,
        validate=validate.Length(min=1, max=len(WEBHOOK_EVENTS) * 4, error="Must name 1 to 5 events."),
        metadata={
            "description": (
                "(1.1) Which events to POST; default the three final ones. task.progress is "
                "coalesced to about one a second."
            )
        },
    )


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
    # strict: 90, not "90", 90.0 or true; the Cancel-After header takes the duration forms.
    cancelAfter = fields.Integer(
        strict=True,
        allow_none=True,
        load_default=None,
        validate=CANCEL_AFTER_RANGE,
        metadata={
            "description": (
                "(1.1) Seconds after submission at which the task, if still queued or running, is "
                "canceled with error.code deadline_exceeded (checked periodically: it may fire a few "
                "seconds late)."
            )
        },
    )

    @validates("metadata")
    def _metadata_size(self, value: dict[str, Any] | None, **_: Any) -> None:
        if value is None:
            return
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > METADATA_MAX_BYTES:
            raise ValidationError(f"Must be at most {METADATA_MAX_BYTES} bytes as JSON ({size}).")


# The Cancel-After header: whole seconds ("90"), or a duration of whole days,
# hours, minutes and seconds, each at most once and in that order ("90s",
# "15m", "2h", "7d", "1h30m"). ASCII digits and lower case only ("M" could be
# read as months). Longer than any valid form, a value is refused unread, so
# a long header cannot cost a big-integer conversion.
_DURATION = re.compile(r"([0-9]+)|(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_UNIT_SECONDS = (1, 86400, 3600, 60, 1)
_HEADER_MAX_CHARS = 32
CANCEL_AFTER_FORMS = "seconds (90) or a duration such as 90s, 15m, 2h, 1h30m or 7d"


def cancel_after_header(value: str) -> int:
    """The ``Cancel-After`` header in seconds; 400 naming the header when it is not one of the forms."""
    text = value.strip()
    found = _DURATION.fullmatch(text) if 0 < len(text) <= _HEADER_MAX_CHARS else None
    if found is None or not any(found.groups()):
        raise ValidationFailed({"Cancel-After": [f"Must be {CANCEL_AFTER_FORMS}."]})
    seconds = sum(int(n) * unit for n, unit in zip(found.groups(), _UNIT_SECONDS, strict=True) if n)
    try:
        CANCEL_AFTER_RANGE(seconds)
    except ValidationError as exc:
        raise ValidationFailed({"Cancel-After": [str(m) for m in exc.messages]}) from None
    return seconds


def cancel_after(field: int | None, header: str | None) -> int | None:
    """The submission's ``cancelAfter``: the field, or the header (its alias); both and different: 400."""
    if header is None:
        return field
    seconds = cancel_after_header(header)
    if field is not None and field != seconds:
        raise ValidationFailed(
            {"cancelAfter": ["Differs from the Cancel-After header."]},
            "The Cancel-After header and the cancelAfter field differ.",
        )
    return seconds


BATCH_MAX_TASKS = 1000


class SubmitBatchSchema(Schema):
    """``POST /v1/tasks/batch``: the envelope only; each item is judged as ``SubmitTaskSchema``, alone."""

    class Meta:
        unknown = RAISE

    # Raw, nulls included: an item that is not a submission is that item's
    # 400, not the batch's.
    tasks = fields.List(
        fields.Raw(allow_none=True),
        required=True,
        validate=validate.Length(min=1, max=BATCH_MAX_TASKS),
    )


class ListTasksQuery(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf([s.value for s in TaskStatus]))
    type = fields.String(validate=validate.Length(max=100))
    idempotencyKey = fields.String(validate=validate.Length(min=1, max=255))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(validate=validate.Length(max=200))


# -- response schemas: they document the representation for OpenAPI ---------


class ErrorDetailSchema(Schema):
    code = fields.String()
    message = fields.String()


class RedeliverFailedSchema(Schema):
    """``POST /v1/deliveries/redeliver``: the organization's failed deliveries since a time, to a host."""

    class Meta:
        unknown = RAISE

    since = fields.AwareDateTime(
        required=True,
        format="iso",
        metadata={"description": "RFC 3339 with its offset: deliveries created at or after it"},
    )
    host = fields.String(
        validate=validate.Length(min=1, max=253),
        metadata={"description": "only deliveries to this host (as in their URL; case does not matter)"},
    )


class RedeliverCountSchema(Schema):
    count = fields.Integer(
        required=True, metadata={"description": "deliveries queued again (at most 10,000)"}
    )


class TaskWebhookSchema(Schema):
    url = fields.String()
    status = fields.String(
        validate=validate.OneOf(["none", "pending", "delivered", "failed"]),
        metadata={"description": "how the delivery of the final event went"},
    )
    attempts = fields.Integer()
    events = fields.List(
        fields.String(validate=validate.OneOf(WEBHOOK_EVENTS)),
        metadata={"description": "(1.1) the events POSTed to the URL (webhook.events, or the default)"},
    )


class ProgressSchema(Schema):
    fraction = fields.Float(
        allow_none=True, validate=validate.Range(0, 1), metadata={"description": "0 to 1, or null"}
    )
    message = fields.String(allow_none=True)
    updatedAt = fields.String(required=True, metadata={"format": "date-time"})


class TaskSchema(Schema):
    taskId = fields.String(required=True)
    type = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf([s.value for s in TaskStatus]))
    input = fields.Raw(allow_none=True)
    result = fields.Raw(allow_none=True, metadata={"description": "present once succeeded"})
    error = fields.Nested(
        ErrorDetailSchema,
        allow_none=True,
        metadata={
            "description": "present once failed; (1.1) once canceled, code canceled or deadline_exceeded"
        },
    )
    idempotencyKey = fields.String(allow_none=True)
    metadata = fields.Dict(allow_none=True)
    cost = fields.Integer(required=True)
    webhook = fields.Nested(TaskWebhookSchema, allow_none=True)
    progress = fields.Nested(
        ProgressSchema,
        allow_none=True,
        metadata={"description": "(1.1) what the task type last reported; null if it never did"},
    )
    cancelAfter = fields.Integer(
        allow_none=True,
        metadata={"description": "(1.1) seconds after submission at which an unfinished task is canceled"},
    )
    createdAt = fields.String(required=True, metadata={"format": "date-time"})
    startedAt = fields.String(allow_none=True, metadata={"format": "date-time"})
    completedAt = fields.String(allow_none=True, metadata={"format": "date-time"})
    expiresAt = fields.String(allow_none=True, metadata={"format": "date-time"})


class TaskListSchema(Schema):
    data = fields.List(fields.Nested(TaskSchema), required=True)
    nextCursor = fields.String(allow_none=True, required=True)


class ProblemSchema(Schema):
    """RFC 9457: the four standard members, and the extension members the API sends."""

    class Meta:
        # RFC 9457 allows extension members, and clients must ignore those
        # they do not know: INCLUDE renders additionalProperties: true.
        unknown = INCLUDE

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "400: each invalid field by its path (`input.seconds`), with its messages"},
    )
    balance = fields.Integer(metadata={"description": "402: the organization's credit balance"})
    cost = fields.Integer(metadata={"description": "402: the task's cost in credits"})
    queued = fields.Integer(metadata={"description": "429 (queue full): the organization's waiting tasks"})
    queueLimit = fields.Integer(metadata={"description": "429 (queue full): the organization's queue limit"})
    idempotencyKey = fields.String(metadata={"description": "422: the idempotency key that was reused"})


class BatchTaskEntrySchema(Schema):
    """An item of a batch that holds a task: created (202) or an idempotent replay (200)."""

    status = fields.Integer(required=True, validate=validate.OneOf([200, 202]))
    task = fields.Nested(TaskSchema, required=True)


class BatchProblemEntrySchema(Schema):
    """An item of a batch that was refused, with the problem ``POST /v1/tasks`` would have answered."""

    status = fields.Integer(required=True, validate=validate.OneOf([400, 402, 422, 429]))
    problem = fields.Nested(ProblemSchema, required=True)


class OrganizationSchema(Schema):
    id = fields.String(required=True)
    name = fields.String(required=True)
    credits = fields.Integer(required=True)
    queueLimit = fields.Integer(required=True)
    queued = fields.Integer(required=True)
    running = fields.Integer(required=True)
    concurrencyLimit = fields.Integer(required=True)


class TaskTypeSchema(Schema):
    type = fields.String(required=True)
    cost = fields.Integer(required=True)
    description = fields.String(required=True)
    inputSchema = fields.Dict(required=True)


class WebhookSecretSchema(Schema):
    secret = fields.String(required=True)


class AttemptSchema(Schema):
    attempt = fields.Integer(required=True)
    at = fields.String(required=True, metadata={"format": "date-time"})
    outcome = fields.String(required=True)
    responseStatus = fields.Integer(allow_none=True)
    durationMs = fields.Integer(required=True)
    error = fields.String(allow_none=True)


class DeliverySchema(Schema):
    webhookId = fields.String(required=True)
    event = fields.String(
        required=True,
        metadata={
            "description": "(1.1) task.started, task.progress, task.succeeded, task.failed or task.canceled"
        },
    )
    eventType = fields.String(
        required=True,
        metadata={"description": "the same as `event`, its name before 1.1; kept for older clients"},
    )
    url = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(["pending", "delivered", "failed"]))
    attempts = fields.List(fields.Nested(AttemptSchema), required=True)


class DeliveryListSchema(Schema):
    data = fields.List(fields.Nested(DeliverySchema), required=True)


class HealthSchema(Schema):
    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String())
