"""What every request and every task needs, built once per process, and its one accessor."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from flask import current_app

from app import redis_conn
from app.db import Database
from app.dispatch import Dispatch, Dispatcher, DispatchSettings, Publisher, TaskLabel
from app.services.task_types import Registry
from app.services.waiting import Waiter
from app.usecases.first_attempt import FirstAttempts
from app.usecases.progress import ProgressWriter
from config import Settings


@dataclass
class Waybill:
    settings: Settings
    db: Database
    registry: Registry
    publisher: Publisher
    redis_client: redis.Redis | None = None
    _dispatcher: Dispatcher | None = None
    _dispatch: Dispatch | None = None
    waiter: Waiter = field(default_factory=lambda: Waiter(8))
    _first_attempts: FirstAttempts | None = None
    _progress: ProgressWriter | None = None

    @property
    def redis(self) -> redis.Redis:
        """The dispatch Redis, connected on first use; RuntimeError when none is configured."""
        if self.redis_client is None:
            # Short timeouts: a Redis that is down must not hold a request;
            # what could not reach Redis is recovered by the sweep.
            self.redis_client = redis_conn.connect(
                self.settings.resolved_redis_url(),
                socket_connect_timeout=2,
                socket_timeout=5,
                health_check_interval=30,
            )
        return self.redis_client

    @property
    def dispatcher(self) -> Dispatcher:
        """The Redis side of dispatch (recovery and tests use it directly)."""
        if self._dispatcher is None:
            s = self.settings
            self._dispatcher = Dispatcher(
                self.redis,
                DispatchSettings(
                    queue_target=s.dispatch_queue_target,
                    release_lease_seconds=s.dispatch_release_lease_seconds,
                ),
            )
        return self._dispatcher

    @property
    def first_attempts(self) -> FirstAttempts:
        """Where a tasks worker sends a finished task's first webhook attempt itself."""
        if self._first_attempts is None:
            from app.usecases import deliver  # the use case needs the container: imported late

            self._first_attempts = FirstAttempts(
                lambda plan: deliver.send_claimed(self, plan),
                self.settings.webhook_first_attempt_threads,
            )
        return self._first_attempts

    @property
    def progress(self) -> ProgressWriter:
        """Where a tasks worker's handlers report progress (stored about once a second per task)."""
        if self._progress is None:
            self._progress = ProgressWriter(self.db, self.dispatch.notify, deliver=self.dispatch.deliver)
        return self._progress

    @property
    def dispatch(self) -> Dispatch:
        """The seam every use case hands work on through."""
        if self._dispatch is None:
            labels = self._task_labels if self.settings.task_events else None
            self._dispatch = Dispatch(lambda: self.dispatcher, self.publisher, labels)
        return self._dispatch

    def _task_labels(self, task_ids: list[str]) -> dict[str, TaskLabel]:
        """Type and organization of released tasks, for Flower (asked only with task events on).

        A prebuilt Core statement on a plain connection: through the ORM
        session this read was a fifth of a tasks worker's CPU under load
        (docs/performance.rst).
        """
        from app.services.statements import TASK_LABELS

        with self.db.read_engine.connect() as conn:
            rows = conn.execute(TASK_LABELS, {"p_ids": task_ids})
            return {task_id: TaskLabel(type_, org_id) for task_id, type_, org_id in rows}


def current() -> Waybill:
    """The running app's container, from a request or a Celery task (both run in an app context)."""
    wb: Waybill = current_app.extensions["waybill"]
    return wb
