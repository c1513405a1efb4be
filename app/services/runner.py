"""Running one task: claim it, run its handler under a renewed lease, record the outcome once."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from app.db import Database
from app.models.base import utcnow
from app.services import tasks
from app.services.task_types import Registry, TaskContext, TaskError

log = logging.getLogger("waybill.runner")

MAX_RESULT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RunSettings:
    lease_seconds: float
    max_attempts: int
    allow_private_targets: bool


@dataclass(frozen=True)
class RunOutcome:
    ran: bool
    recorded: bool
    delivery_id: str | None = None
    status: str | None = None


class _Heartbeat:
    """Renews the run's lease every third of its length while the handler runs."""

    def __init__(self, db: Database, task_id: str, attempt: int, lease_seconds: float) -> None:
        self.db, self.task_id, self.attempt, self.lease = db, task_id, attempt, lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{task_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                with self.db.session() as session:
                    until = utcnow() + timedelta(seconds=self.lease)
                    if not tasks.renew_lease(session, self.task_id, self.attempt, until):
                        return  # canceled or taken over: nothing left to renew
            except Exception:  # a database blip: try again at the next beat
                log.warning("lease renewal failed", extra={"task_id": self.task_id})


def execute(db: Database, registry: Registry, settings: RunSettings, task_id: str) -> RunOutcome:
    with db.session() as session:
        claim = tasks.claim(
            session,
            task_id,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
        )
        task = claim.task
        if task is None:
            return RunOutcome(
                ran=False, recorded=claim.delivery_id is not None, delivery_id=claim.delivery_id
            )
        attempt = claim.attempt
        task_type = registry.get(task.type)
        task_input = task.input
        context = TaskContext(
            task_id=task.id,
            organization_id=task.organization_id,
            attempt=attempt,
            allow_private_targets=settings.allow_private_targets,
        )
    log.info(
        "task started",
        extra={"event": "task.started", "task_id": task_id, "attempt": attempt, "type": task.type},
    )
    result: Any = None
    error: tuple[str, str] | None = None
    with _Heartbeat(db, task_id, attempt, settings.lease_seconds):
        if task_type is None:
            error = ("unknown_type", f"No handler is installed for task type {task.type!r}.")
        else:
            try:
                result = task_type.handler(task_input, context)
            except TaskError as exc:
                error = (exc.code, exc.message)
            except Exception as exc:
                error = ("handler_error", f"{type(exc).__name__}: {exc}"[:1000])
            else:
                error = _check_result(result)
                if error is not None:
                    result = None
    with db.session() as session:
        recorded, delivery_id = tasks.record_result(session, task_id, attempt, result=result, error=error)
    status = "failed" if error else "succeeded"
    log.info(
        "task finished" if recorded else "task outcome discarded",
        extra={
            "event": "task.finished" if recorded else "task.discarded",
            "task_id": task_id,
            "attempt": attempt,
            "status": status,
        },
    )
    return RunOutcome(ran=True, recorded=recorded, delivery_id=delivery_id, status=status)


def _check_result(result: Any) -> tuple[str, str] | None:
    try:
        size = len(json.dumps(result))
    except (TypeError, ValueError) as exc:
        return ("result_not_json", f"The handler's result is not JSON: {exc}"[:1000])
    if size > MAX_RESULT_BYTES:
        return ("result_too_large", "The handler's result is larger than 4 MiB.")
    return None
