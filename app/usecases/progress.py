"""Progress a running task reports through its context, stored at most about once a second.

A handler calls ``context.progress(fraction, message)`` as often as it likes:
the call only replaces the task's pending report in memory and returns, so
reporting never waits on SQL or Redis and never slows the task. A thread of
the worker process writes the latest pending report of each task, at most
one write per task every ``interval`` seconds (the latest report wins, the
ones in between are coalesced), as one conditional UPDATE: only the run that
holds the task's current attempt of a ``running`` task writes, so a report
that arrives after the result, or from a run that lost its lease, changes
nothing. After the commit it wakes the task's channel in Redis, which the
event streams (``GET /v1/tasks/{id}/events``) and ``Prefer: wait`` listen on.
A task whose ``webhook.events`` asks for ``task.progress`` gets, in the same
transaction, one delivery per stored report (so webhooks too are coalesced
to about one a second, the latest state winning), sent on the usual signed,
retried path.

When the handler returns, its last report still pending is written before the
result is recorded (:meth:`ProgressWriter.flush`), so the stored progress is
the last one the handler made. A report lost with a dying process is only a
progress report: the next one, or the final event, supersedes it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session

from app.db import Database
from app.models import TaskStatus
from app.models.base import utcnow
from app.services import deliveries, lifecycle
from app.services.representation import iso
from app.services.statements import TASKS, bind
from app.services.task_types import checked

log = logging.getLogger("waybill.runner")

# At most one write per task per interval (docs/api.md: "at most a few per second").
DEFAULT_INTERVAL_SECONDS = 1.0

STORE_PROGRESS = (
    update(TASKS)
    .where(
        TASKS.c.id == bindparam("p_id"),
        TASKS.c.status == TaskStatus.RUNNING.value,
        TASKS.c.attempts == bindparam("p_attempt"),
    )
    .values(progress=bind("p_progress", "progress"), progress_seq=TASKS.c.progress_seq + 1)
    .returning(TASKS.c.progress_seq, TASKS.c.webhook_url, TASKS.c.webhook_events)
)


@dataclass
class _Pending:
    attempt: int
    fraction: float | None
    message: str | None
    reported_at: Any  # datetime of the report: the representation's updatedAt


class ProgressWriter:
    """One per worker process: the pending reports, and the thread that writes them."""

    def __init__(
        self,
        db: Database,
        notify: Callable[[str, str], None],
        interval: float = DEFAULT_INTERVAL_SECONDS,
        deliver: Callable[[str | None], object] | None = None,
    ) -> None:
        self._db = db
        self._notify = notify
        self._deliver = deliver
        self._interval = interval
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._written_at: dict[str, float] = {}  # task id -> monotonic time of its last write
        self._pid = 0

    def report(self, task_id: str, attempt: int, fraction: float | None, message: str | None) -> None:
        """Keep the latest report of a task for the writer; returns at once."""
        fraction, message = checked(fraction, message)
        with self._lock:
            self._ensure_thread()
            self._pending[task_id] = _Pending(attempt, fraction, message, utcnow())
        self._wake.set()

    def flush(self, task_id: str) -> None:
        """Write this task's pending report now (its handler returned), and forget the task."""
        with self._lock:
            pending = self._pending.pop(task_id, None)
            self._written_at.pop(task_id, None)
        if pending is not None:
            self._write(task_id, pending)

    def _ensure_thread(self) -> None:
        # Per process: a Celery prefork child does not inherit its parent's threads.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._pending.clear()
            self._written_at.clear()
            threading.Thread(target=self._loop, name="progress-writer", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            for task_id, pending in self._due():
                try:
                    self._write(task_id, pending)
                except Exception:  # a database away: the next report tries again
                    log.warning("progress not stored", exc_info=True, extra={"event": "task.progress_failed"})

    def _due(self) -> list[tuple[str, _Pending]]:
        """The pending reports whose task was last written at least ``interval`` ago."""
        now = time.monotonic()
        due = []
        with self._lock:
            for task_id in list(self._pending):
                if now - self._written_at.get(task_id, -math.inf) >= self._interval:
                    due.append((task_id, self._pending.pop(task_id)))
                    self._written_at[task_id] = now
            if self._pending:
                self._wake.set()  # some wait for their interval: look again soon
        if self._pending:
            time.sleep(min(self._interval / 4, 0.25))
        return due

    def _write(self, task_id: str, pending: _Pending) -> None:
        progress = {
            "fraction": pending.fraction,
            "message": pending.message,
            "updatedAt": iso(pending.reported_at),
        }
        delivery_id = None
        with self._db.session() as session:
            stored = (
                session.connection()
                .execute(
                    STORE_PROGRESS, {"p_id": task_id, "p_attempt": pending.attempt, "p_progress": progress}
                )
                .first()
            )
            if stored is None:
                return  # no longer this run's to report on: finished, canceled or taken over
            if stored.webhook_url and "task.progress" in deliveries.wanted_events(stored.webhook_events):
                # In the same transaction: a stored report and its delivery go together.
                delivery_id = _progress_delivery(session, task_id, stored.progress_seq)
        self._notify(task_id, "progress")
        if delivery_id is not None and self._deliver is not None:
            self._deliver(delivery_id)


def _progress_delivery(session: Session, task_id: str, seq: int) -> str:
    """The ``task.progress`` webhook of the report just stored: one delivery per stored report."""
    task = lifecycle.event_task(session, task_id)
    return deliveries.create_for_event(session, task, "task.progress", now=utcnow(), seq=seq)
