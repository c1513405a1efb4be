"""Deleting tasks past their retention, with their deliveries and attempts; the ledger keeps its rows."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import rowcount
from app.models import Task, WebhookAttempt, WebhookDelivery
from app.models.base import utcnow


def delete_expired(session: Session, *, now: datetime | None = None, batch: int = 500) -> int:
    """Delete one batch of expired tasks; returns how many.

    Small batches in their own transactions, so the tables are never locked
    for long; the ledger keeps its rows (the balance is their sum).
    """
    now = now or utcnow()
    expired = list(
        session.execute(
            select(Task.id).where(Task.expires_at <= now).order_by(Task.expires_at).limit(batch)
        ).scalars()
    )
    return delete_tasks(session, expired)


def delete_tasks(session: Session, task_ids: list[str]) -> int:
    """Delete tasks with their deliveries and attempts."""
    if not task_ids:
        return 0
    # Explicit rather than ON DELETE CASCADE alone, so SQLite files created
    # without foreign-key enforcement are cleaned the same way.
    delivery_ids = select(WebhookDelivery.id).where(WebhookDelivery.task_id.in_(task_ids))
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(delivery_ids)))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.task_id.in_(task_ids)))
    return rowcount(session.execute(delete(Task).where(Task.id.in_(task_ids))))
