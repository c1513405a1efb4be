"""Reading tasks as their organization sees them: one task, or a page of them."""

from __future__ import annotations

import base64
import binascii

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app import ids
from app.models import Task
from app.models.base import utcnow
from app.services.errors import NotFound, ValidationFailed


def is_expired(task: Task) -> bool:
    """Past its retention: gone for every reader, though retention may not have deleted it yet."""
    return task.expires_at is not None and task.expires_at <= utcnow()


def get_task(session: Session, organization_id: str, task_id: str) -> Task:
    task = session.get(Task, task_id) if ids.is_task_id(task_id) else None
    if task is None or task.organization_id != organization_id or is_expired(task):
        # The same answer for another organization's task as for a missing one.
        raise NotFound("No task with this id.")
    return task


def encode_cursor(task_id: str) -> str:
    return base64.urlsafe_b64encode(task_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValidationFailed({"cursor": ["Not a cursor returned by this API."]}) from None
    if not ids.is_task_id(raw):
        raise ValidationFailed({"cursor": ["Not a cursor returned by this API."]})
    return raw


def list_tasks(
    session: Session,
    organization_id: str,
    *,
    status: str | None = None,
    type: str | None = None,
    idempotency_key: str | None = None,
    limit: int = 20,
    cursor: str | None = None,
) -> tuple[list[Task], str | None]:
    """Newest first; the cursor is the last id seen, so pages are stable as tasks arrive."""
    query = select(Task).where(
        Task.organization_id == organization_id,
        or_(Task.expires_at.is_(None), Task.expires_at > utcnow()),
    )
    if status:
        query = query.where(Task.status == status)
    if type:
        query = query.where(Task.type == type)
    if idempotency_key is not None:
        query = query.where(Task.idempotency_key == idempotency_key)
    if cursor:
        query = query.where(Task.id < decode_cursor(cursor))
    rows = list(session.execute(query.order_by(Task.id.desc()).limit(limit + 1)).scalars())
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
