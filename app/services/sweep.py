"""The periodic sweep that makes "nothing accepted is lost" true.

Beat triggers it every ``SWEEP_INTERVAL_SECONDS``. It finds, from SQL alone:

* tasks ``queued`` that it has not confirmed yet (``dispatched_at IS
  NULL``): the web does not write to SQL after its enqueue, so the sweep
  checks them against Redis in batches, enqueues those that never entered
  dispatch (Redis was down after the commit, or the web process died in
  between) and marks them all confirmed;
* tasks ``running`` whose lease expired (their worker died) -- they go back
  to dispatch, and the next claim retries them or, after the last attempt,
  fails them;
* webhook deliveries ``pending`` whose next attempt is overdue (the countdown
  message was lost with a worker or the broker);
* tasks ``queued`` or ``running`` past their deadline (``cancelAfter``):
  :func:`overdue`, canceled by :mod:`app.usecases.deadlines`.

Enqueueing or publishing twice is harmless: enqueue skips a task that already
waits or is leased, and claims are conditional, so a duplicate message finds
nothing to do. A Redis that lost its data is rebuilt from SQL
(:func:`app.usecases.recovery.rebuild`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.models import DeliveryStatus, Organization, Task, TaskStatus, WebhookDelivery
from app.models.base import utcnow

BATCH = 500


@dataclass
class SweepPlan:
    # running, SQL lease expired a grace period ago: no live run holds them,
    # whatever Redis still says, so their dispatch lease is dropped and they
    # go back to the front of their organization's list.
    orphaned_ids: list[str] = field(default_factory=list)
    delivery_ids: list[str] = field(default_factory=list)


def plan(
    session: Session,
    *,
    grace_seconds: float,
    now: datetime | None = None,
) -> SweepPlan:
    now = now or utcnow()
    grace = now - timedelta(seconds=grace_seconds)
    out = SweepPlan()
    lease_expired = select(Task.id).where(
        Task.status == TaskStatus.RUNNING.value,
        Task.lease_expires_at < grace,
    )
    out.orphaned_ids.extend(session.execute(lease_expired.limit(BATCH)).scalars())
    overdue = (
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at < grace,
            or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now),
        )
        .limit(BATCH)
    )
    out.delivery_ids.extend(session.execute(overdue).scalars())
    if out.delivery_ids:
        # Due again only after another grace period: a sweep that finds the
        # webhook worker down does not pile up copies every interval.
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(out.delivery_ids))
            .values(next_attempt_at=now)
        )
    return out


def unconfirmed(
    session: Session, *, grace_seconds: float, now: datetime | None = None, limit: int = BATCH
) -> list[str]:
    """Queued tasks older than the grace period that the sweep has not confirmed in dispatch yet."""
    grace = (now or utcnow()) - timedelta(seconds=grace_seconds)
    return list(
        session.execute(
            select(Task.id)
            .where(
                Task.status == TaskStatus.QUEUED.value,
                Task.dispatched_at.is_(None),
                Task.created_at < grace,
            )
            .limit(limit)
        ).scalars()
    )


def overdue(session: Session, status: TaskStatus, *, now: datetime, limit: int = BATCH) -> list[str]:
    """Tasks of ``status`` whose deadline has passed, earliest first, at most ``limit``.

    One range scan of the ``(status, deadline_at)`` index per status: the
    cost follows the tasks that are due, not the backlog (tasks without a
    deadline have a NULL ``deadline_at`` and are never in the range).
    """
    return list(
        session.execute(
            select(Task.id)
            .where(Task.status == status.value, Task.deadline_at <= now)
            .order_by(Task.deadline_at)
            .limit(limit)
        ).scalars()
    )


def reconcile_counters(session: Session) -> dict[str, tuple[int, int]]:
    """Set each organization's queued/running counters to the truth in SQL.

    The counters move in the same transactions as the tasks, so they should
    never drift; this heals them if a bug or a manual edit ever makes them.
    Returns the organizations that were corrected, with their new counts.
    """
    counts: dict[str, dict[str, int]] = {}
    rows = session.execute(
        select(Task.organization_id, Task.status, func.count())
        .where(Task.status.in_([TaskStatus.QUEUED.value, TaskStatus.RUNNING.value]))
        .group_by(Task.organization_id, Task.status)
    )
    for org_id, status, n in rows:
        counts.setdefault(org_id, {})[status] = n
    nonzero = session.execute(
        select(Organization.id).where(or_(Organization.queued != 0, Organization.running != 0))
    ).scalars()
    suspects = sorted(set(counts) | set(nonzero))
    fixed: dict[str, tuple[int, int]] = {}
    for org_id in suspects:
        have = counts.get(org_id, {})
        org = session.get(Organization, org_id)
        assert org is not None
        if org.queued == have.get("queued", 0) and org.running == have.get("running", 0):
            continue
        # Recount under the organization's row lock: every counter change
        # holds that lock, so the recount cannot race one.
        org = session.execute(
            select(Organization)
            .where(Organization.id == org_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one()
        queued, running = _count(session, org_id)
        if (org.queued, org.running) != (queued, running):
            org.queued, org.running = queued, running
            fixed[org_id] = (queued, running)
    return fixed


def _count(session: Session, organization_id: str) -> tuple[int, int]:
    rows = dict(
        session.execute(
            select(Task.status, func.count())
            .where(
                Task.organization_id == organization_id,
                Task.status.in_([TaskStatus.QUEUED.value, TaskStatus.RUNNING.value]),
            )
            .group_by(Task.status)
        ).all()
    )
    return int(rows.get("queued", 0)), int(rows.get("running", 0))
