"""Recovery: put back into dispatch what SQL says is waiting and Redis does not hold.

SQL is the source of truth for every task; Redis's dispatch state can lose
any part of it (a restart empty, a restore from an older snapshot, an
eviction, a web process that died between its commit and its enqueue). The
sweep (:mod:`app.usecases.sweep`) calls these; each is idempotent, since
enqueueing a task Redis already holds, waiting or leased, does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from app.db import Database
from app.dispatch import Dispatcher
from app.models import Organization, Task, TaskStatus
from app.models.base import utcnow
from app.usecases.unit_of_work import UnitOfWork


def enqueue_from_sql(
    db: Database,
    dispatcher: Dispatcher,
    task_ids: Iterable[str],
    *,
    drop_leases: bool = False,
    status: TaskStatus | None = None,
) -> int:
    """Make sure tasks SQL says are waiting (or whose run died) are in dispatch; returns the missing ones.

    A task Redis already holds, waiting or leased, is left where it is (the
    enqueue script skips it); a missing one goes to the front of its
    organization's list. Every task given gets ``dispatched_at``: the sweep
    has confirmed it and does not look at it again.
    ``drop_leases``: the tasks' runs are known dead (their SQL lease expired),
    so a dispatch lease Redis may still hold for them is stale and is dropped.
    ``status``: only the tasks still in this status (one read, under the check).
    """
    ids = list(task_ids)
    if not ids:
        return 0
    with db.read_session() as session:
        rows = session.execute(
            select(Task.id, Task.organization_id, Organization.concurrency_limit)
            .join(Organization, Organization.id == Task.organization_id)
            .where(Task.id.in_(ids), *([Task.status == status.value] if status is not None else []))
            .order_by(Task.id.desc())  # LPUSH one by one: the oldest ends up first
        ).all()
    if not rows:
        return 0

    def queue(pipe: Any) -> None:
        for task_id, org_id, limit in rows:
            if drop_leases:
                dispatcher.release(task_id, client=pipe)
            dispatcher.enqueue(org_id, task_id, limit, front=True, client=pipe)

    results = dispatcher.batch(queue)
    added = sum(1 for r in (results[1::2] if drop_leases else results) if r)
    with UnitOfWork(db) as uow:
        uow.session.execute(
            update(Task)
            .where(Task.id.in_([r[0] for r in rows]), Task.dispatched_at.is_(None))
            .values(dispatched_at=utcnow())
        )
    return added


def verify_queued(
    db: Database,
    dispatcher: Dispatcher,
    *,
    grace_seconds: float,
    batches: int = 10,
    batch: int = 2000,
    now: datetime | None = None,
) -> tuple[int, int]:
    """Check queued tasks against Redis, whatever their ``dispatched_at``; returns (checked, restored).

    Redis may come back from an older snapshot (a restart from RDB or AOF,
    a failover to a lagging replica) or evict keys: its epoch is there, the
    sweep's confirmation flag says the task was handed over, and still
    Redis does not know the task. This walk finds every such task: queued
    tasks in id order (the ``(status, id)`` index) from a cursor kept in
    Redis, at most ``batches * batch`` per call, one Redis round trip per
    batch; at the end of the table it starts over. Each sweep (every 5 s)
    checks 20,000: a backlog of 240,000 queued tasks is walked in a minute.
    Tasks younger than the grace period are left to their submission.
    """
    grace = (now or utcnow()) - timedelta(seconds=grace_seconds)
    cursor = dispatcher.verify_cursor()
    checked = restored = 0
    for _ in range(batches):
        with db.read_session() as session:
            ids = list(
                session.execute(
                    select(Task.id)
                    .where(Task.status == TaskStatus.QUEUED.value, Task.id > cursor, Task.created_at < grace)
                    .order_by(Task.id)
                    .limit(batch)
                ).scalars()
            )
        checked += len(ids)
        missing = dispatcher.missing(ids)
        if missing:
            restored += enqueue_from_sql(db, dispatcher, missing, status=TaskStatus.QUEUED)
        if len(ids) < batch:
            cursor = ""  # the end of the table: the next walk starts over
            break
        cursor = ids[-1]
    dispatcher.set_verify_cursor(cursor)
    return checked, restored


def rebuild(db: Database, dispatcher: Dispatcher, *, batch: int = 5000) -> int:
    """Rebuild the dispatch state from SQL after Redis lost it; returns the tasks enqueued."""
    count = 0
    last = ""
    while True:
        with db.read_session() as session:
            rows: list[Any] = list(
                session.execute(
                    select(Task.id, Task.organization_id, Organization.concurrency_limit)
                    .join(Organization, Organization.id == Task.organization_id)
                    .where(
                        Task.status.in_([TaskStatus.QUEUED.value, TaskStatus.RUNNING.value]), Task.id > last
                    )
                    .order_by(Task.id)
                    .limit(batch)
                ).all()
            )
        if not rows:
            break

        def queue(pipe: Any, rows: list[Any] = rows) -> None:
            for task_id, org_id, limit in rows:
                dispatcher.enqueue(org_id, task_id, limit, client=pipe)

        # One round trip per batch: 100,000 waiting tasks must not hold the
        # maintenance queue for 100,000 round trips.
        count += sum(1 for added in dispatcher.batch(queue) if added)
        last = rows[-1][0]
    dispatcher.mark_epoch()
    return count
