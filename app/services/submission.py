"""Submitting a task: validate, reserve credits, take a queue place and store it, in one transaction."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import ids
from app.models import Organization, Task, TaskStatus, WebhookStatus
from app.models.base import utcnow
from app.services import statements as st
from app.services.errors import IdempotencyConflict, InsufficientCredits, QueueFull, ValidationFailed
from app.services.queries import is_expired
from app.services.retention import delete_tasks
from app.services.task_types import Registry


@dataclass(frozen=True)
class SubmitRequest:
    type: str
    input: Any = None
    webhook_url: str | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None

    def fingerprint(self) -> str:
        """What makes two submissions "the same request" for an idempotency key.

        The type, the input, the webhook URL and the metadata, compared as JSON
        values (key order and white space do not matter).
        """
        canonical = json.dumps(
            [self.type, self.input, self.webhook_url, self.metadata],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Submitted:
    task: Task
    created: bool  # False: an idempotent replay of an earlier submission
    concurrency_limit: int = 0  # the organization's, for dispatch


def submit(
    session: Session,
    organization_id: str,
    req: SubmitRequest,
    *,
    registry: Registry,
    request_id: str | None = None,
) -> Submitted:
    """Store the task, or find the one its idempotency key names; the caller commits, then dispatches."""
    task_type = registry.get(req.type)
    if task_type is None:
        raise ValidationFailed({"type": [f"Unknown task type. Known types: {', '.join(registry.names())}."]})
    task_input = task_type.load_input(req.input)
    fingerprint = req.fingerprint()

    if req.idempotency_key is not None:
        existing = _by_idempotency_key(session, organization_id, req.idempotency_key)
        if existing is not None and is_expired(existing):
            # GET and list already say it does not exist: its key is free
            # again. Deleted now (retention would soon) so the new task can have it.
            delete_tasks(session, [existing.id])
            existing = None
        if existing is not None:
            return _replay(existing, req.idempotency_key, fingerprint)

    cost = task_type.cost
    now = utcnow()
    if req.idempotency_key is None:
        # No unique key to race for: no savepoint needed.
        task, concurrency_limit = _insert(
            session, organization_id, req, task_input, fingerprint, cost, now, request_id
        )
        return Submitted(task=task, created=True, concurrency_limit=concurrency_limit)
    try:
        # The task INSERT comes first, so a request that loses an idempotency
        # race fails before it takes credits or a queue place; the savepoint
        # is there because on PostgreSQL a failed statement aborts the whole
        # transaction, and this one still has to read the winner's task.
        with session.begin_nested():
            task, concurrency_limit = _insert(
                session, organization_id, req, task_input, fingerprint, cost, now, request_id
            )
    except IntegrityError:
        # Another request claimed this idempotency key first and has
        # committed (the unique index made us wait for it): replay it.
        existing = _by_idempotency_key(session, organization_id, req.idempotency_key)
        if existing is None:
            raise
        return _replay(existing, req.idempotency_key, fingerprint)
    return Submitted(task=task, created=True, concurrency_limit=concurrency_limit)


def _insert(
    session: Session,
    organization_id: str,
    req: SubmitRequest,
    task_input: Any,
    fingerprint: str,
    cost: int,
    now: datetime,
    request_id: str | None,
) -> tuple[Task, int]:
    values = {
        "id": ids.task_id(),
        "organization_id": organization_id,
        "type": req.type,
        "status": TaskStatus.QUEUED.value,
        "input": task_input,
        "task_metadata": req.metadata,
        "idempotency_key": req.idempotency_key,
        "request_hash": fingerprint,
        "cost": cost,
        "refunded": False,
        "webhook_url": req.webhook_url,
        "webhook_status": WebhookStatus.NONE.value,
        "webhook_attempts": 0,
        "attempts": 0,
        "request_id": request_id,
        "created_at": now,
    }
    task = Task(**values)  # not added to the session: it is only represented
    conn = session.connection()
    conn.execute(st.INSERT_TASK, {st.TASK_COLUMN[k]: v for k, v in values.items()})
    if cost:
        conn.execute(
            st.INSERT_LEDGER,
            {
                "organization_id": organization_id,
                "task_id": task.id,
                "kind": "reserve",
                "amount": -cost,
                "created_at": now,
            },
        )
    # The organization's row last: on PostgreSQL its lock, which every
    # submission of the organization waits for, is then held only for this
    # statement and the commit. A refusal rolls the whole transaction back.
    taken = conn.execute(st.TAKE_PLACE, {"p_org": organization_id, "p_cost": cost}).first()
    if taken is None:
        org = session.get(Organization, organization_id, populate_existing=True)
        assert org is not None
        if org.credits < cost:
            raise InsufficientCredits(balance=org.credits, cost=cost)
        raise QueueFull(org.queued, org.queue_limit)  # the use case sets Retry-After from Redis
    return task, int(taken[0])


def _by_idempotency_key(session: Session, organization_id: str, key: str) -> Task | None:
    return session.execute(
        select(Task).where(Task.organization_id == organization_id, Task.idempotency_key == key)
    ).scalar_one_or_none()


def _replay(existing: Task, key: str, fingerprint: str) -> Submitted:
    if existing.request_hash != fingerprint:
        raise IdempotencyConflict(key)
    return Submitted(task=existing, created=False)


def retry_after(drain_rate: float) -> int:
    """Seconds until a queue place is likely free, from the recent drain rate (tasks/s)."""
    if drain_rate <= 1e-6:
        return 60
    return max(1, min(3600, math.ceil(1.0 / drain_rate)))
