"""What the console's pages read: bounded, indexed queries (the views write no SQL).

Every list has a limit. Time ranges over tasks and deliveries become ranges
of their ids, which are ULIDs and sort by creation time (``app/ids.py``), so
they walk the primary key or the ``(organization_id, ..., id)`` indexes
instead of scanning a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session
from ulid import ULID

from app import ids
from app.models import (
    CreditEntry,
    DeliveryStatus,
    Organization,
    Task,
    TaskStatus,
    WebhookAttempt,
    WebhookDelivery,
)
from app.models.base import utcnow
from app.services.bulk_redelivery import host_of

OVERVIEW_ORGANIZATIONS = 50
LEDGER_PAGE = 50
TASKS_PAGE = 50
FAILING_HOST_ROWS = 5000  # deliveries read to group by host; the page says when it is reached
FINAL = [s.value for s in TaskStatus if s.is_final]


def id_at(prefix: str, at: datetime) -> str:
    """The smallest id of ``prefix`` made at ``at`` (its millisecond, zero random bits)."""
    ms = max(0, int(at.timestamp() * 1000))
    return f"{prefix}_{str(ULID.from_bytes(ms.to_bytes(6, 'big') + bytes(10))).lower()}"


def _not_expired(now: datetime) -> Any:
    return or_(Task.expires_at.is_(None), Task.expires_at > now)


# Overview


@dataclass(frozen=True)
class OrganizationLoad:
    id: str
    name: str
    credits: int
    queued: int
    running: int
    queue_limit: int
    concurrency_limit: int
    finished_recently: int = 0
    deliveries_pending: int = 0
    deliveries_failed: int = 0


def organization_count(session: Session) -> int:
    return int(session.execute(select(func.count()).select_from(Organization)).scalar_one())


def busiest_organizations(
    session: Session, *, drain_window: timedelta, failed_window: timedelta, retention_days: float
) -> list[OrganizationLoad]:
    """The organizations with the most tasks in hand, with their recent throughput and deliveries."""
    now = utcnow()
    orgs = session.execute(
        select(Organization)
        .order_by((Organization.queued + Organization.running).desc(), Organization.id)
        .limit(OVERVIEW_ORGANIZATIONS)
    ).scalars()
    rows = list(orgs)
    org_ids = [o.id for o in rows]
    if not org_ids:
        return []
    since = now - drain_window
    # A finished task's expires_at is its completed_at plus the retention, so
    # the expires_at index finds the tasks finished in the window (with the
    # current retention); completed_at then keeps exactly those.
    finished = _counts(
        session,
        select(Task.organization_id, func.count())
        .where(
            Task.expires_at >= since + timedelta(days=retention_days),
            Task.completed_at >= since,
            Task.organization_id.in_(org_ids),
        )
        .group_by(Task.organization_id),
    )
    d = WebhookDelivery
    pending = _counts(
        session,
        select(d.organization_id, func.count())
        .where(d.organization_id.in_(org_ids), d.status == DeliveryStatus.PENDING.value)
        .group_by(d.organization_id),
    )
    failed = _counts(
        session,
        select(d.organization_id, func.count())
        .where(
            d.organization_id.in_(org_ids),
            d.status == DeliveryStatus.FAILED.value,
            d.created_at >= now - failed_window,
        )
        .group_by(d.organization_id),
    )
    return [
        OrganizationLoad(
            id=o.id,
            name=o.name,
            credits=o.credits,
            queued=o.queued,
            running=o.running,
            queue_limit=o.queue_limit,
            concurrency_limit=o.concurrency_limit,
            finished_recently=int(finished.get(o.id, 0)),
            deliveries_pending=int(pending.get(o.id, 0)),
            deliveries_failed=int(failed.get(o.id, 0)),
        )
        for o in rows
    ]


def _counts(session: Session, query: Any) -> dict[str, int]:
    """``{organization_id: count}`` from a ``SELECT organization_id, count(*) ... GROUP BY``."""
    return {str(org_id): int(n) for org_id, n in session.execute(query)}


# Organization


def ledger_page(
    session: Session, organization_id: str, *, before: int | None = None, limit: int = LEDGER_PAGE
) -> tuple[list[CreditEntry], int | None]:
    """The latest ledger entries (before entry ``before``), and the cursor of the next page."""
    query = select(CreditEntry).where(CreditEntry.organization_id == organization_id)
    if before is not None:
        query = query.where(CreditEntry.id < before)
    rows = list(session.execute(query.order_by(CreditEntry.id.desc()).limit(limit + 1)).scalars())
    next_before = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_before


# Tasks


@dataclass(frozen=True)
class TaskSearch:
    task_id: str = ""
    organization_id: str = ""
    idempotency_key: str = ""
    status: str = ""
    type: str = ""
    created_from: datetime | None = None
    created_to: datetime | None = None
    before: str = ""  # the page cursor: the last task id shown

    def problems(self) -> dict[str, str]:
        """Filters that would need a scan: each is served by an index with the organization only."""
        out: dict[str, str] = {}
        if self.status and self.status not in {s.value for s in TaskStatus}:
            out["status"] = "not a task status"
        if not self.organization_id:
            if self.idempotency_key:
                out["idempotency_key"] = "an idempotency key belongs to an organization: give it too"
            if self.type:
                out["type"] = "searching by type needs the organization"
        if self.before and not ids.is_task_id(self.before):
            out["before"] = "not a task id"
        if self.created_from and self.created_to and self.created_from >= self.created_to:
            out["created_to"] = "must be after the start of the range"
        return out


def search_tasks(
    session: Session, search: TaskSearch, *, limit: int = TASKS_PAGE
) -> tuple[list[Task], str | None]:
    """Tasks matching the filters, newest first, and the cursor of the next page (or None)."""
    now = utcnow()
    if search.task_id:
        task = find_task(session, search.task_id)
        return ([task] if task is not None else []), None
    query = select(Task).where(_not_expired(now))
    if search.organization_id:
        query = query.where(Task.organization_id == search.organization_id)
    if search.status:
        query = query.where(Task.status == search.status)
    if search.type:
        query = query.where(Task.type == search.type)
    if search.idempotency_key:
        query = query.where(Task.idempotency_key == search.idempotency_key)
    if search.created_from is not None:
        query = query.where(Task.id >= id_at("task", search.created_from))
    if search.created_to is not None:
        query = query.where(Task.id < id_at("task", search.created_to))
    if search.before:
        query = query.where(Task.id < search.before)
    rows = list(session.execute(query.order_by(Task.id.desc()).limit(limit + 1)).scalars())
    next_before = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_before


def find_task(session: Session, task_id: str) -> Task | None:
    """Any organization's task by id; None once past its retention, as the API answers 404."""
    task = session.get(Task, task_id) if ids.is_task_id(task_id) else None
    if task is None or (task.expires_at is not None and task.expires_at <= utcnow()):
        return None
    return task


# Deliveries


@dataclass
class FailingHost:
    host: str
    failed: int = 0  # deliveries that ended failed
    retrying: int = 0  # still pending, after failed attempts
    recovered: int = 0  # delivered in the end, after failed attempts
    organizations: set[str] = field(default_factory=set)
    last_error: str | None = None


def failing_hosts(
    session: Session, *, window: timedelta, retry_span: timedelta
) -> tuple[list[FailingHost], bool]:
    """Hosts of deliveries that failed, or had failed attempts, in the window; and whether rows were capped.

    A delivery is found from its creation: those created in the window plus
    the span of its retries (a delivery with a failed attempt in the window
    was created at most that long before, unless it was redelivered by
    hand), by the primary key (``msg_`` ids are ULIDs); then its attempts by
    their ``delivery_id`` index. Hosts are grouped here, from the URL, as
    bulk redelivery matches them.
    """
    now = utcnow()
    since = now - window
    d, a = WebhookDelivery, WebhookAttempt
    failed_attempt = and_(a.delivery_id == d.id, a.outcome != DeliveryStatus.DELIVERED.value, a.at >= since)
    last_error = (
        select(a.error)
        .where(a.delivery_id == d.id, a.outcome != DeliveryStatus.DELIVERED.value)
        .order_by(a.attempt.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = session.execute(
        select(d.url, d.status, d.organization_id, last_error)
        .where(
            d.id >= id_at("msg", since - retry_span),
            # A failed delivery's last attempt is a failed one: this finds both.
            exists(select(a.id).where(failed_attempt)),
        )
        .order_by(d.id.desc())
        .limit(FAILING_HOST_ROWS)
    ).all()
    hosts: dict[str, FailingHost] = {}
    for url, status, organization_id, error in rows:
        host = host_of(url) or "(no host)"
        entry = hosts.setdefault(host, FailingHost(host))
        if status == DeliveryStatus.FAILED.value:
            entry.failed += 1
        elif status == DeliveryStatus.PENDING.value:
            entry.retrying += 1
        else:
            entry.recovered += 1
        entry.organizations.add(organization_id)
        if entry.last_error is None:  # rows come newest first
            entry.last_error = error
    ordered = sorted(hosts.values(), key=lambda h: (-(h.failed + h.retrying), h.host))
    return ordered, len(rows) >= FAILING_HOST_ROWS
