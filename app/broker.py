"""The Celery-backed :class:`~app.services.dispatch.Publisher`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery

RUN_TASK = "waybill.tasks.run"
DELIVER_WEBHOOK = "waybill.webhooks.deliver"
TASKS_QUEUE = "tasks"
WEBHOOKS_QUEUE = "webhooks"


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


def reuse_redis_clients() -> None:
    """Make kombu's Redis channel publish through one client instead of a new one per message.

    kombu 5's ``Channel.conn_or_acquire`` builds a ``redis.Redis`` object for
    every message and every event it publishes (the TCP connection comes from
    the channel's pool either way). Building one takes about 70 us with
    redis-py 8, and a task publishes four or five (its message, the
    ``task-sent``, ``task-received``, ``task-started`` and ``task-succeeded``
    events Flower reads): 9% of a Celery worker's CPU in py-spy profiles.
    A channel now keeps one client on its own pool and builds a new one only
    when the channel has replaced its pool (after a connection error).
    Idempotent; every process that builds the Celery app calls it.
    """
    from kombu.transport import redis as kombu_redis

    channel: Any = kombu_redis.Channel
    if getattr(channel, "_waybill_reuses_clients", False):
        return

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_waybill_client")
        if cached is None or cached.connection_pool is not pool:
            cached = self._waybill_client = self._create_client()
        yield cached

    channel.conn_or_acquire = conn_or_acquire
    channel._waybill_reuses_clients = True
