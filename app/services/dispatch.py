"""How a stored task or webhook attempt reaches a worker.

This is the only place the web side hands work to the broker, through a
:class:`Publisher` (Celery in production, a recorder in unit tests). A
publish that fails after the SQL commit is logged and left to the sweep: the
task row, not the broker message, is the source of truth.
"""

from __future__ import annotations

import logging
from typing import Protocol

from sqlalchemy import update

from app.db import Database
from app.models import Task, TaskStatus
from app.models.base import utcnow

log = logging.getLogger("waybill.dispatch")


class Publisher(Protocol):
    def run_task(self, task_id: str) -> None: ...

    def deliver_webhook(self, delivery_id: str, countdown: float | None = None) -> None: ...

    def revoke(self, task_id: str) -> None: ...


def dispatch_task(db: Database, publisher: Publisher, task_id: str) -> bool:
    """Publish ``tasks.run(task_id)`` and note when; False leaves it to the sweep."""
    try:
        publisher.run_task(task_id)
    except Exception as exc:  # any broker failure: the sweep publishes it later
        log.warning(
            "publish failed; the sweep will publish the task",
            extra={"event": "task.publish_failed", "task_id": task_id, "error": type(exc).__name__},
        )
        return False
    with db.session() as session:
        session.execute(
            update(Task)
            .where(Task.id == task_id, Task.status.in_([TaskStatus.QUEUED, TaskStatus.RUNNING]))
            .values(dispatched_at=utcnow())
        )
    return True


def dispatch_delivery(publisher: Publisher, delivery_id: str | None, countdown: float | None = None) -> bool:
    """Publish one webhook attempt; a failure is left to the sweep (next_attempt_at is in SQL)."""
    if delivery_id is None:
        return False
    try:
        publisher.deliver_webhook(delivery_id, countdown)
    except Exception as exc:
        log.warning(
            "publish failed; the sweep will send the webhook",
            extra={
                "event": "webhook.publish_failed",
                "webhook_id": delivery_id,
                "error": type(exc).__name__,
            },
        )
        return False
    return True
