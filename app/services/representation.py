"""The task representation, as the API returns it and the webhooks send it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.models import Task, TaskStatus


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# The events a webhook receives when webhook.events is not given (docs/api.md),
# in the order of WEBHOOK_EVENTS_ORDER.
WEBHOOK_EVENTS_ORDER = ("task.started", "task.progress", "task.succeeded", "task.failed", "task.canceled")
DEFAULT_WEBHOOK_EVENTS = "task.succeeded,task.failed,task.canceled"


def _events(stored: str | None) -> list[str]:
    return (stored or DEFAULT_WEBHOOK_EVENTS).split(",")


def represent(task: Task) -> dict[str, Any]:
    """The task as the API and the webhooks show it."""
    out: dict[str, Any] = {
        "taskId": task.id,
        "type": task.type,
        "status": task.status,
        "input": task.input,
        "idempotencyKey": task.idempotency_key,
        "metadata": task.task_metadata,
        "cost": task.cost,
        "webhook": (
            {
                "url": task.webhook_url,
                "status": task.webhook_status,
                "attempts": task.webhook_attempts,
                "events": _events(task.webhook_events),
            }
            if task.webhook_url
            else None
        ),
        "progress": task.progress,
        "cancelAfter": task.cancel_after,
        "createdAt": iso(task.created_at),
        "startedAt": iso(task.started_at),
        "completedAt": iso(task.completed_at),
        "expiresAt": iso(task.expires_at),
    }
    if task.status == TaskStatus.SUCCEEDED:
        out["result"] = task.result
    if task.status == TaskStatus.FAILED or (
        task.status == TaskStatus.CANCELED and task.error_code is not None
    ):
        out["error"] = {"code": task.error_code, "message": task.error_message}
    return out
