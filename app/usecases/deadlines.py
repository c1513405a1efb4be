"""Deadlines: cancel the queued and running tasks whose ``cancelAfter`` has passed.

Driven from SQL by the periodic sweep (:func:`app.usecases.sweep.run_sweep`,
every ``SWEEP_INTERVAL_SECONDS``), so a deadline holds across restarts of
any process and whatever Redis lost: ``deadline_at`` is a column, read
through the ``(status, deadline_at)`` index. Each expiry is its own small
transaction through :func:`app.services.lifecycle.expire`, the conditional
end every other end uses, so a worker recording its result or a client
canceling at the same moment ends the task one way only. The claim applies
the same rule (:func:`app.services.lifecycle.claim`): a task whose deadline
passed while it waited is never started.
"""

from __future__ import annotations

import logging
from datetime import datetime

from app.container import Waybill
from app.db import is_transient
from app.metrics import TASKS_FINISHED
from app.models import TaskStatus
from app.models.base import utcnow
from app.services import lifecycle, sweep
from app.usecases.cancel import after_cancel
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.worker")

# Batches (of sweep.BATCH tasks) per status and sweep: the work of one sweep
# stays bounded however many deadlines fall at once; the next sweep goes on.
MAX_BATCHES = 10


def expire_overdue(
    wb: Waybill,
    *,
    now: datetime | None = None,
    batch: int = sweep.BATCH,
    max_batches: int = MAX_BATCHES,
) -> int:
    """Cancel the tasks past their deadline, queued first; returns how many this call canceled.

    At most ``batch * max_batches`` per status and call. ``now`` (tests)
    fixes the clock for the look-up and the expiries alike; otherwise each
    expiry reads the clock when it runs. The caller steps dispatch
    afterwards (the slots freed can serve other tasks).
    """
    expired = 0
    for status in (TaskStatus.QUEUED, TaskStatus.RUNNING):
        for _ in range(max_batches):
            with wb.db.read_session() as session:
                due = sweep.overdue(session, status, now=now or utcnow(), limit=batch)
            failed = False
            for task_id in due:
                try:
                    expired += expire(wb, task_id, now=now)
                except Exception as exc:
                    if is_transient(exc):
                        raise  # the database is away: the next sweep starts over
                    # One task that cannot be ended must not hold up the others'
                    # deadlines; it stays due, and the next sweep tries again.
                    failed = True
                    log.exception(
                        "deadline expiry failed",
                        extra={
                            "event": "task.deadline_failed",
                            "task_id": task_id,
                            "error": type(exc).__name__,
                        },
                    )
            if failed or len(due) < batch:
                break  # all due ones are done (or one failed: it would come back in every batch)
    return expired


def expire(wb: Waybill, task_id: str, *, now: datetime | None = None) -> bool:
    """Cancel one task as ``deadline_exceeded`` if it is still unfinished and due; True if this did."""
    with UnitOfWork(wb.db) as uow:
        ended = lifecycle.expire(
            uow.session, task_id, now=now or utcnow(), retention_days=wb.settings.result_retention_days
        )
        if ended.done:
            after_cancel(uow, wb, task_id, ended)
    if not ended.done:
        return False  # it finished, or was canceled, first
    TASKS_FINISHED.labels(ended.type, TaskStatus.CANCELED.value).inc()
    log.info(
        "task deadline exceeded",
        extra={
            "event": "task.deadline_exceeded",
            "task_id": task_id,
            "organization_id": ended.organization_id,
            "status": f"was={ended.was}",
        },
    )
    return True
