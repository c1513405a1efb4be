"""Bulk redelivery: every ``failed`` delivery of an organization since a time, optionally to one host.

The same move as redelivering one task's events (``deliveries.redeliver``):
the delivery becomes ``pending`` again, due now, with one attempt more than
it has used, and keeps its ``webhook-id``. It is done in batches, each its
own transaction, so a large recovery holds no lock for long and a crash
part-way leaves every delivery either untouched (still ``failed``, found by
the next call) or redelivered (``pending``, sent by its message or the sweep).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import cast
from urllib.parse import urlsplit

from sqlalchemy import Table, select, update
from sqlalchemy.orm import Session

from app.models import DeliveryStatus, Task, WebhookDelivery, WebhookStatus
from app.models.base import utcnow
from app.services.representation import FINAL_EVENTS

_D = cast(Table, WebhookDelivery.__table__)
_TASKS = cast(Table, Task.__table__)
BATCH = 500
# At most this many per call: a call answers in seconds, whatever the backlog;
# what is left is still ``failed`` and the next call takes it (docs/operations.rst).
MAX_PER_CALL = 10_000


def normalized_host(host: str) -> str:
    """A host as URLs carry it, for comparison: lower case, no trailing dot, IDNA for non-ASCII."""
    host = host.strip().rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return host


def host_of(url: str) -> str:
    try:
        return normalized_host(urlsplit(url).hostname or "")
    except ValueError:
        return ""


def failed_batches(
    session: Session, organization_id: str, since: datetime, host: str | None
) -> Iterator[list[str]]:
    """Ids of the organization's failed deliveries created since ``since`` (to ``host``), in batches."""
    wanted = normalized_host(host) if host else None
    after_created: datetime | None = None
    after_id = ""
    taken = 0
    while taken < MAX_PER_CALL:
        query = (
            select(_D.c.id, _D.c.url, _D.c.created_at)
            .where(
                _D.c.organization_id == organization_id,
                _D.c.status == DeliveryStatus.FAILED.value,
                _D.c.created_at >= since,
            )
            .order_by(_D.c.created_at, _D.c.id)
            .limit(BATCH)
        )
        if after_created is not None:
            # Keyset: strictly after the last row seen (rows redelivered meanwhile left the index range).
            later = _D.c.created_at > after_created
            query = query.where(later | ((_D.c.created_at == after_created) & (_D.c.id > after_id)))
        rows = session.execute(query).all()
        if not rows:
            return
        after_created, after_id = rows[-1].created_at, rows[-1].id
        ids = [r.id for r in rows if wanted is None or host_of(r.url) == wanted]
        ids = ids[: MAX_PER_CALL - taken]
        taken += len(ids)
        if ids:
            yield ids
        if len(rows) < BATCH:
            return


def redeliver_ids(session: Session, delivery_ids: list[str], *, now: datetime | None = None) -> list[str]:
    """Make these deliveries pending again, due now, if they are still failed; returns those moved.

    The conditional UPDATE is the check: a delivery redelivered meanwhile (by
    another call, the console, a task's own redelivery) is not moved twice.
    A final event's task shows its webhook ``pending`` again.
    """
    now = now or utcnow()
    rows = session.execute(
        update(_D)
        .where(_D.c.id.in_(delivery_ids), _D.c.status == DeliveryStatus.FAILED.value)
        .values(
            status=DeliveryStatus.PENDING.value,
            max_attempts=_D.c.attempts + 1,
            next_attempt_at=now,
            claimed_until=None,
        )
        .returning(_D.c.id, _D.c.task_id, _D.c.event_type)
    ).all()
    finals = sorted({r.task_id for r in rows if r.event_type in FINAL_EVENTS})
    if finals:
        session.execute(
            update(_TASKS).where(_TASKS.c.id.in_(finals)).values(webhook_status=WebhookStatus.PENDING.value)
        )
    return [r.id for r in rows]
