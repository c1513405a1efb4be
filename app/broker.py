"""The Celery-backed :class:`~app.dispatch.Publisher`: the only code that sends Celery messages."""

from __future__ import annotations

from celery import Celery

from app.queues import DELIVER_WEBHOOK, RUN_TASK, TASKS_QUEUE, WEBHOOKS_QUEUE


class CeleryPublisher:
    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def run_task(self, task_id: str) -> None:
        # The Celery id is the task id: Flower and `celery inspect` show a
        # task under the id clients know, and a revoke reaches every copy.
        self.celery.send_task(RUN_TASK, args=[task_id], queue=TASKS_QUEUE, task_id=task_id)

    def deliver_webhook(self, delivery_id: str, countdown: float | None = None) -> None:
        self.celery.send_task(DELIVER_WEBHOOK, args=[delivery_id], queue=WEBHOOKS_QUEUE, countdown=countdown)

    def revoke(self, task_id: str) -> None:
        """Best effort: stop a running task's process; its result is discarded anyway."""
        self.celery.control.revoke(task_id, terminate=True, signal="SIGTERM")
