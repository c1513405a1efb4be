"""Submitting, reading and moving tasks through their statuses.

Status moves are conditional updates under a row lock, so every move happens
once however many workers or sweeps race: ``queued -> running`` (claim),
``running -> succeeded | failed`` (only by the run that holds the current
attempt), ``queued | running -> canceled``. The organization's ``queued`` and
``running`` counters move in the same transactions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, Text, bindparam, insert, inspect, or_, select, update
from sqlalchemy import cast as cast_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from app import ids
from app.db import rowcount
from app.models import CreditEntry, Organization, Task, TaskStatus
from app.models.base import utcnow
from app.services import deliveries
from app.services.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    NotFound,
    QueueFull,
    TaskAlreadyFinal,
    ValidationFailed,
)
from app.services.task_types import Registry

DEFAULT_RETENTION_DAYS = 30.0
WORKER_LOST = "worker_lost"


# -- submission -------------------------------------------------------------


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
    """Validate, reserve credits, take a queue place and store the task, in one transaction.

    The caller commits, then dispatches the task.
    """
    task_type = registry.get(req.type)
    if task_type is None:
        raise ValidationFailed({"type": [f"Unknown task type. Known types: {', '.join(registry.names())}."]})
    task_input = task_type.load_input(req.input)
    fingerprint = req.fingerprint()

    if req.idempotency_key is not None:
        existing = _by_idempotency_key(session, organization_id, req.idempotency_key)
        if existing is not None and _expired(existing):
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


# The submission's statements, built once: building an ORM statement, its
# cache key and its ORM bulk-DML state was most of a submission's Python time
# in profiles, and on SQLite that time was spent holding the write lock.
_TASKS, _ORGS, _LEDGER = (cast(Table, m.__table__) for m in (Task, Organization, CreditEntry))
# ORM attribute -> column name: some differ (``task_metadata`` is ``metadata``).
_TASK_COLUMN = {attr.key: attr.columns[0].name for attr in inspect(Task).column_attrs}
_INSERT_TASK = insert(_TASKS)
_INSERT_LEDGER = insert(_LEDGER)
# One conditional update checks both limits and takes both the credits and
# the queue place: exact under any concurrency, O(1) at any backlog.
_TAKE_PLACE = (
    update(_ORGS)
    .where(
        _ORGS.c.id == bindparam("p_org"),
        _ORGS.c.credits >= bindparam("p_cost"),
        _ORGS.c.queued < _ORGS.c.queue_limit,
    )
    .values(credits=_ORGS.c.credits - bindparam("p_cost"), queued=_ORGS.c.queued + 1)
    .returning(_ORGS.c.concurrency_limit)
)


# A run's statements, built once for the same reason, and Core rather than
# ORM-enabled UPDATEs (the ORM's bulk-DML machinery was 12% of a worker's
# CPU): the claim returns the task's columns, from which a detached Task is
# made for the runner; the record returns what its bookkeeping needs.
def _bind(name: str, column: str) -> Any:
    return bindparam(name, type_=_TASKS.c[column].type)


_TASK_ATTR = {column: attr for attr, column in _TASK_COLUMN.items()}
# A claim returns the task without decoding its input: the input comes back
# as JSON text, decoded by the runner after the claim has committed, so that
# an input that cannot be decoded is the run's recorded failure rather than
# a claim that rolls back and is retried forever.
_PLAIN_COLUMNS = [c for c in _TASKS.c if c.name not in ("input", "result")]
_INPUT_TEXT = cast_(_TASKS.c.input, Text).label("input_json")
_CLAIM_QUEUED = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("p_id"), _TASKS.c.status == TaskStatus.QUEUED.value)
    .values(
        status=TaskStatus.RUNNING.value,
        attempts=_TASKS.c.attempts + 1,
        started_at=_bind("p_now", "started_at"),  # a queued task has never started
        lease_expires_at=_bind("p_lease", "lease_expires_at"),
    )
    .returning(*_PLAIN_COLUMNS, _INPUT_TEXT)
)
_INPUT_OF = select(_INPUT_TEXT).where(_TASKS.c.id == bindparam("p_id"))


def _detached(row: Any) -> Task:
    """A Task made from a row of plain columns; nothing is written through it."""
    return Task(**{_TASK_ATTR[c.name]: row._mapping[c.name] for c in _PLAIN_COLUMNS})


_ORG_STARTED = (
    update(_ORGS)
    .where(_ORGS.c.id == bindparam("p_org"))
    .values(queued=_ORGS.c.queued - 1, running=_ORGS.c.running + 1)
)


def _record_statement(failed: bool) -> Any:
    values: dict[str, Any] = {
        "status": (TaskStatus.FAILED if failed else TaskStatus.SUCCEEDED).value,
        "completed_at": _bind("p_now", "completed_at"),
        "expires_at": _bind("p_expires", "expires_at"),
        "lease_expires_at": None,
    }
    if failed:
        values["error_code"] = _bind("p_code", "error_code")
        values["error_message"] = _bind("p_message", "error_message")
        # A running task has never been refunded; as in refund(), a free one has nothing to give back.
        values["refunded"] = _TASKS.c.cost > 0
    else:
        values["result"] = _bind("p_result", "result")
    # One conditional UPDATE is the row lock, the attempt check and the write.
    return (
        update(_TASKS)
        .where(
            _TASKS.c.id == bindparam("p_id"),
            _TASKS.c.status == TaskStatus.RUNNING.value,
            _TASKS.c.attempts == bindparam("p_attempt"),
        )
        .values(**values)
        .returning(_TASKS.c.organization_id, _TASKS.c.cost, _TASKS.c.webhook_url)
    )


_RECORD_SUCCEEDED, _RECORD_FAILED = _record_statement(False), _record_statement(True)
_ORG_FINISHED = (
    update(_ORGS)
    .where(_ORGS.c.id == bindparam("p_org"))
    .values(running=_ORGS.c.running - 1, credits=_ORGS.c.credits + bindparam("p_refund"))
)
_ORG_FINISHED_QUEUED = (
    update(_ORGS)
    .where(_ORGS.c.id == bindparam("p_org"))
    .values(queued=_ORGS.c.queued - 1, credits=_ORGS.c.credits + bindparam("p_refund"))
)
_LOCK_PLAIN = (
    select(_TASKS.c.status, _TASKS.c.organization_id, _TASKS.c.cost, _TASKS.c.refunded, _TASKS.c.webhook_url)
    .where(_TASKS.c.id == bindparam("p_id"))
    .with_for_update()
)
_EVENT_ROW = select(*_PLAIN_COLUMNS, _INPUT_TEXT, cast_(_TASKS.c.result, Text).label("result_json")).where(
    _TASKS.c.id == bindparam("p_id")
)
_WEBHOOK_PENDING = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("p_id"))
    .values(webhook_status="pending", webhook_attempts=0)
)


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
        "webhook_status": "none",
        "webhook_attempts": 0,
        "attempts": 0,
        "request_id": request_id,
        "created_at": now,
    }
    task = Task(**values)  # not added to the session: it is only represented
    conn = session.connection()
    conn.execute(_INSERT_TASK, {_TASK_COLUMN[k]: v for k, v in values.items()})
    if cost:
        conn.execute(
            _INSERT_LEDGER,
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
    taken = conn.execute(_TAKE_PLACE, {"p_org": organization_id, "p_cost": cost}).first()
    if taken is None:
        org = session.get(Organization, organization_id, populate_existing=True)
        assert org is not None
        if org.credits < cost:
            raise InsufficientCredits(balance=org.credits, cost=cost)
        raise QueueFull(org.queued, org.queue_limit)  # the web layer sets Retry-After from Redis
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


# -- reading ------------------------------------------------------------------


def get_task(session: Session, organization_id: str, task_id: str) -> Task:
    task = session.get(Task, task_id) if ids.is_task_id(task_id) else None
    if task is None or task.organization_id != organization_id or _expired(task):
        # The same answer for another organization's task as for a missing one.
        raise NotFound("No task with this id.")
    return task


def _expired(task: Task) -> bool:
    """Past its retention: gone for every reader, though retention may not have deleted it yet."""
    return task.expires_at is not None and task.expires_at <= utcnow()


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


# -- moving through statuses ---------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """The outcome of a worker's attempt to start a task."""

    task: Task | None  # set when this run may execute the handler
    attempt: int = 0
    delivery_id: str | None = None  # set when the claim itself finished the task
    # Without a task: "gone" (missing or final: forget it), "lost" (this claim
    # failed it after its last attempt died) or "busy" (another run holds a
    # live lease: leave its slot alone).
    reason: str = ""
    type: str = ""
    lease_expires_at: datetime | None = None  # with "busy": when the other run's lease ends
    input_json: str | None = None  # with a task: its input as JSON text (``decode_input``)


def decode_input(input_json: str | None) -> Any:
    """A claimed task's input, from the JSON text the claim returned."""
    return None if input_json is None else json.loads(input_json)


def _lock_task(session: Session, task_id: str) -> Task | None:
    # Input and result are left in the database: a claim or a cancel needs
    # neither, and one that cannot be decoded must not stop them.
    return session.execute(
        select(Task)
        .where(Task.id == task_id)
        .options(defer(Task.input), defer(Task.result))
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def _lock_org(session: Session, organization_id: str) -> Organization:
    return session.execute(
        select(Organization)
        .where(Organization.id == organization_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()


def claim(
    session: Session,
    task_id: str,
    *,
    lease_seconds: float,
    max_attempts: int,
    now: datetime | None = None,
    retention_days: float = DEFAULT_RETENTION_DAYS,
) -> Claim:
    """Start a run: ``queued -> running``, or take over a run whose lease expired.

    A run whose worker died leaves the task ``running`` with an expired lease;
    the next claim starts attempt n+1, and after ``max_attempts`` such runs the
    task fails with ``worker_lost``.
    """
    now = now or utcnow()
    lease = now + timedelta(seconds=lease_seconds)
    # The common case, a queued task, in two statements and no ORM unit of
    # work: the conditional UPDATE is the row lock and the status check.
    conn = session.connection()
    row = conn.execute(_CLAIM_QUEUED, {"p_id": task_id, "p_now": now, "p_lease": lease}).first()
    if row is not None:
        started = _detached(row)
        conn.execute(_ORG_STARTED, {"p_org": started.organization_id})
        return Claim(task=started, attempt=started.attempts, input_json=row.input_json)
    task = _lock_task(session, task_id)
    if task is None:
        return Claim(task=None, reason="gone")
    if task.status == TaskStatus.QUEUED:  # queued after all: our UPDATE raced its commit
        org = _lock_org(session, task.organization_id)
        org.queued -= 1
        org.running += 1
    elif (
        task.status == TaskStatus.RUNNING
        and task.lease_expires_at is not None
        and (task.lease_expires_at < now)
    ):
        if task.attempts >= max_attempts:
            delivery_id = _finish(
                session,
                task,
                TaskStatus.FAILED,
                error=(
                    WORKER_LOST,
                    f"The worker running this task stopped {task.attempts} times "
                    "(killed or lost); the task was not retried again.",
                ),
                now=now,
                retention_days=retention_days,
            )
            return Claim(task=None, delivery_id=delivery_id, reason="lost", type=task.type)
    elif task.status == TaskStatus.RUNNING:
        return Claim(task=None, reason="busy", lease_expires_at=task.lease_expires_at)
    else:
        return Claim(task=None, reason="gone")
    task.status = TaskStatus.RUNNING.value
    task.attempts += 1
    task.started_at = task.started_at or now
    task.lease_expires_at = lease
    input_json = conn.execute(_INPUT_OF, {"p_id": task_id}).scalar_one()
    return Claim(task=task, attempt=task.attempts, input_json=input_json)


def renew_lease(session: Session, task_id: str, attempt: int, until: datetime) -> bool:
    """Extend the lease of the run that holds ``attempt``; False once it lost the task."""
    done = rowcount(
        session.execute(
            update(Task)
            .where(Task.id == task_id, Task.status == TaskStatus.RUNNING.value, Task.attempts == attempt)
            .values(lease_expires_at=until)
        )
    )
    return bool(done)


def record_result(
    session: Session,
    task_id: str,
    attempt: int,
    *,
    result: Any = None,
    error: tuple[str, str] | None = None,
    now: datetime | None = None,
    retention_days: float = DEFAULT_RETENTION_DAYS,
) -> tuple[bool, str | None]:
    """Record the run's outcome once; returns (recorded, webhook delivery id to publish).

    Only the run holding the current attempt of a ``running`` task records:
    a duplicate message, a run that lost its lease, or a run of a task
    canceled meanwhile gets ``False`` and its outcome is discarded.
    """
    now = now or utcnow()
    status = TaskStatus.FAILED if error is not None else TaskStatus.SUCCEEDED
    params: dict[str, Any] = {
        "p_id": task_id,
        "p_attempt": attempt,
        "p_now": now,
        "p_expires": now + timedelta(days=retention_days),
    }
    if error is not None:
        params["p_code"], params["p_message"] = error
    else:
        params["p_result"] = result
    conn = session.connection()
    row = conn.execute(_RECORD_FAILED if error is not None else _RECORD_SUCCEEDED, params).first()
    if row is None:
        return False, None
    refund_amount = row.cost if error is not None else 0
    conn.execute(_ORG_FINISHED, {"p_org": row.organization_id, "p_refund": refund_amount})
    if refund_amount:
        # The ledger's unique (task_id, kind) is the backstop against a second refund.
        conn.execute(
            _INSERT_LEDGER,
            {
                "organization_id": row.organization_id,
                "task_id": task_id,
                "kind": "refund",
                "amount": refund_amount,
                "created_at": now,
            },
        )
    if row.webhook_url:
        return True, _create_event(session, task_id, f"task.{status.value}", now=now)
    return True, None


def _create_event(session: Session, task_id: str, event_type: str, *, now: datetime) -> str:
    """The event's delivery, with the task as it is now; its webhook status becomes pending."""
    row = session.connection().execute(_EVENT_ROW, {"p_id": task_id}).one()
    task = _detached(row)
    # A stored value that cannot be decoded (a task accepted before the
    # input limits) is sent as null rather than blocking the event.
    task.input, task.result = _loads_or_none(row.input_json), _loads_or_none(row.result_json)
    delivery_id = deliveries.create_for_event(session, task, event_type, now=now)
    session.connection().execute(_WEBHOOK_PENDING, {"p_id": task_id})
    return delivery_id


def _loads_or_none(text: str | None) -> Any:
    try:
        return decode_input(text)
    except (ValueError, RecursionError):
        return None


def fail_task(
    session: Session,
    task_id: str,
    code: str,
    message: str,
    *,
    now: datetime | None = None,
    retention_days: float = DEFAULT_RETENTION_DAYS,
) -> tuple[bool, str | None]:
    """End a queued or running task as ``failed``, whatever state its run is in.

    The last resort of a run that raised where it should not have (claiming,
    decoding, recording): plain statements that read neither the input nor
    the result, so the failure is recorded even when those are what broke.
    Refunds once and moves the counters like any other end; returns
    (failed now, webhook delivery id to publish).
    """
    now = now or utcnow()
    conn = session.connection()
    row = conn.execute(_LOCK_PLAIN, {"p_id": task_id}).first()
    if row is None or TaskStatus(row.status).is_final:
        return False, None
    refund_amount = row.cost if row.cost and not row.refunded else 0
    conn.execute(
        update(_TASKS)
        .where(_TASKS.c.id == task_id)
        .values(
            status=TaskStatus.FAILED.value,
            error_code=code,
            error_message=message[:1000],
            completed_at=now,
            expires_at=now + timedelta(days=retention_days),
            lease_expires_at=None,
            refunded=bool(row.refunded or refund_amount),
        )
    )
    counters = _ORG_FINISHED_QUEUED if row.status == TaskStatus.QUEUED else _ORG_FINISHED
    conn.execute(counters, {"p_org": row.organization_id, "p_refund": refund_amount})
    if refund_amount:
        conn.execute(
            _INSERT_LEDGER,
            {
                "organization_id": row.organization_id,
                "task_id": task_id,
                "kind": "refund",
                "amount": refund_amount,
                "created_at": now,
            },
        )
    if row.webhook_url:
        return True, _create_event(session, task_id, "task.failed", now=now)
    return True, None


def cancel(
    session: Session, organization_id: str, task_id: str, *, retention_days: float = DEFAULT_RETENTION_DAYS
) -> tuple[Task, str | None, bool]:
    """Cancel a waiting or running task; returns (task, delivery id, was running)."""
    get_task(session, organization_id, task_id)
    task = _lock_task(session, task_id)
    assert task is not None
    if TaskStatus(task.status).is_final:
        raise TaskAlreadyFinal(f"The task is already {task.status}.")
    was_running = task.status == TaskStatus.RUNNING
    delivery_id = _finish(session, task, TaskStatus.CANCELED, now=utcnow(), retention_days=retention_days)
    return task, delivery_id, was_running


def _finish(
    session: Session,
    task: Task,
    status: TaskStatus,
    *,
    now: datetime,
    retention_days: float,
    result: Any = None,
    error: tuple[str, str] | None = None,
) -> str | None:
    org = _lock_org(session, task.organization_id)
    if task.status == TaskStatus.QUEUED:
        org.queued -= 1
    elif task.status == TaskStatus.RUNNING:
        org.running -= 1
    task.status = status.value
    task.completed_at = now
    task.expires_at = now + timedelta(days=retention_days)
    task.lease_expires_at = None
    if status == TaskStatus.SUCCEEDED:
        task.result = result
    if error is not None:
        task.error_code, task.error_message = error
    if status in (TaskStatus.FAILED, TaskStatus.CANCELED):
        refund(session, task, org, now=now)
    session.flush()
    if task.webhook_url:
        return deliveries.create_for_event(session, task, f"task.{status.value}", now=now)
    return None


def refund(session: Session, task: Task, org: Organization, *, now: datetime) -> bool:
    """Give the task's credits back, once: the flag and the ledger's unique key both say so."""
    if task.refunded or not task.cost:
        return False
    done = rowcount(
        session.execute(
            update(Task).where(Task.id == task.id, Task.refunded.is_(False)).values(refunded=True)
        )
    )
    if not done:
        return False
    task.refunded = True
    org.credits += task.cost
    session.add(
        CreditEntry(organization_id=org.id, task_id=task.id, kind="refund", amount=task.cost, created_at=now)
    )
    return True


def delete_expired(session: Session, *, now: datetime | None = None, batch: int = 500) -> int:
    """Delete one batch of expired tasks (their deliveries and attempts cascade); returns how many.

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
    """Delete tasks with their deliveries and attempts; the ledger keeps its rows."""
    if not task_ids:
        return 0
    from sqlalchemy import delete

    from app.models import WebhookAttempt, WebhookDelivery

    # Explicit rather than ON DELETE CASCADE alone, so SQLite files created
    # without foreign-key enforcement are cleaned the same way.
    delivery_ids = select(WebhookDelivery.id).where(WebhookDelivery.task_id.in_(task_ids))
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(delivery_ids)))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.task_id.in_(task_ids)))
    return rowcount(session.execute(delete(Task).where(Task.id.in_(task_ids))))
