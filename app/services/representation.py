"""The task representation, as the API returns it and the webhooks send it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.models import Task, TaskStatus
from app.models.entities import FINAL_STATUSES


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# The events a webhook may receive (webhook.events), in the order a task goes
# through them and the order its webhook_events column stores them in.
WEBHOOK_EVENTS = ("task.started", "task.progress", "task.succeeded", "task.failed", "task.canceled")
# The events that end a task; they are also what a webhook receives by default (docs/api.md).
FINAL_EVENTS = frozenset(f"task.{s.value}" for s in FINAL_STATUSES)
DEFAULT_WEBHOOK_EVENTS = tuple(e for e in WEBHOOK_EVENTS if e in FINAL_EVENTS)


def webhook_events(stored: str | None) -> tuple[str, ...]:
    """The events a task's webhook receives, in order, from its ``webhook_events`` column (None: default)."""
    return DEFAULT_WEBHOOK_EVENTS if stored is None else tuple(e for e in stored.split(",") if e)


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
                "events": list(webhook_events(task.webhook_events)),
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
