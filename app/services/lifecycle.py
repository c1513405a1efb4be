"""A task's moves through its statuses, each once however many workers or sweeps race.

``queued -> running`` (claim), ``running -> running`` (a new attempt after its
run died), ``running -> succeeded | failed`` (only by the run holding the
current attempt), ``queued | running -> failed | canceled`` (:func:`finish`:
a client's cancel, a lost worker, or :func:`expire` once a task's
``cancelAfter`` has passed).
Every move is a conditional statement under the task's row lock, and moves
the organization's ``queued``/``running`` counters and, for a task that
failed or was canceled, refunds its credits once, in the same transaction:
through :func:`_settle` only.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db import rowcount
from app.models import Task, TaskStatus
from app.models.base import utcnow
from app.services import deliveries
from app.services import statements as st
from app.services.errors import TaskAlreadyFinal
from app.services.queries import get_task

DEFAULT_RETENTION_DAYS = 30.0
WORKER_LOST = "worker_lost"
# error.code of a canceled task (docs/api.md): by the client, or its cancelAfter passed.
CANCELED_BY_CLIENT = "canceled"
DEADLINE_EXCEEDED = "deadline_exceeded"


class ClaimReason(enum.StrEnum):
    """Why a claim gave no task to run."""

    GONE = "gone"  # missing or final: forget it
    LOST = "lost"  # this claim failed it: its last attempt's worker died
    BUSY = "busy"  # another run holds a live lease: leave its slot alone
    EXPIRED = "expired"  # this claim canceled it: its cancelAfter had passed


@dataclass(frozen=True)
class Claim:
    """The outcome of a worker's attempt to start a task."""

    task: Task | None  # set when this run may execute the handler (detached: read only)
    attempt: int = 0
    input_json: str | None = None  # with a task: its input as JSON text (:func:`decode_input`)
    reason: ClaimReason | None = None  # without a task
    # With LOST or EXPIRED: the final event to publish; with a task just
    # started: its task.started event, when webhook.events asks for it.
    delivery_id: str | None = None
    type: str = ""
    lease_expires_at: datetime | None = None  # with BUSY: when the other run's lease ends

    @property
    def ended(self) -> TaskStatus | None:
        """The final status this claim gave the task instead of starting it, if it ended it."""
        if self.reason == ClaimReason.LOST:
            return TaskStatus.FAILED
        if self.reason == ClaimReason.EXPIRED:
            return TaskStatus.CANCELED
        return None


def decode_input(input_json: str | None) -> Any:
    """A claimed task's input, from the JSON text the claim returned."""
    return None if input_json is None else json.loads(input_json)


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
    task fails with ``worker_lost``. A task whose deadline (``cancelAfter``)
    has passed is not started: the claim cancels it (``deadline_exceeded``).
    """
    now = now or utcnow()
    params = {"p_id": task_id, "p_now": now, "p_lease": now + timedelta(seconds=lease_seconds)}
    conn = session.connection()
    # The common case, a queued task: the conditional UPDATE is the row lock and the check.
    row = conn.execute(st.CLAIM_QUEUED, params).first()
    if row is None:
        current = conn.execute(st.LOCK_TASK, {"p_id": task_id}).first()
        if current is None or TaskStatus(current.status).is_final:
            return Claim(task=None, reason=ClaimReason.GONE)
        busy = current.status == TaskStatus.RUNNING and (
            current.lease_expires_at is not None and current.lease_expires_at >= now
        )
        if busy:
            # A live run past its deadline is the sweep's to cancel (and revoke).
            return Claim(task=None, reason=ClaimReason.BUSY, lease_expires_at=current.lease_expires_at)
        if _overdue(current, now):
            ended = _end(
                session,
                task_id,
                current,
                TaskStatus.CANCELED,
                error=deadline_error(current.cancel_after),
                now=now,
                retention_days=retention_days,
            )
            return Claim(
                task=None, reason=ClaimReason.EXPIRED, delivery_id=ended.delivery_id, type=current.type
            )
        if current.status == TaskStatus.QUEUED:  # our UPDATE raced its commit: we hold the lock now
            row = conn.execute(st.CLAIM_QUEUED, params).one()
        elif current.attempts >= max_attempts:
            message = (
                f"The worker running this task stopped {current.attempts} times "
                "(killed or lost); the task was not retried again."
            )
            ended = _end(
                session,
                task_id,
                current,
                TaskStatus.FAILED,
                error=(WORKER_LOST, message),
                now=now,
                retention_days=retention_days,
            )
            return Claim(task=None, reason=ClaimReason.LOST, delivery_id=ended.delivery_id, type=current.type)
        else:
            taken = conn.execute(st.TAKE_OVER, params).one()
            return Claim(task=st.detached(taken), attempt=taken.attempts, input_json=taken.input_json)
    conn.execute(st.ORG_STARTED, {"p_org": row.organization_id})
    task = st.detached(row)
    started = None
    if row.webhook_url and "task.started" in deliveries.wanted_events(row.webhook_events):
        # Only here, at the first start: a taken-over run is not a new start.
        shown = st.detached(row)
        shown.input = _loads_or_none(row.input_json)
        started = deliveries.create_for_event(session, shown, "task.started", now=now)
    return Claim(task=task, attempt=row.attempts, input_json=row.input_json, delivery_id=started)


def renew_lease(session: Session, task_id: str, attempt: int, until: datetime) -> bool:
    """Extend the lease of the run that holds ``attempt``; False once it lost the task."""
    return bool(
        rowcount(session.execute(st.RENEW_LEASE, {"p_id": task_id, "p_attempt": attempt, "p_until": until}))
    )


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
    row = session.connection().execute(st.RECORD_FAILED if error else st.RECORD_SUCCEEDED, params).first()
    if row is None:
        return False, None
    refund = row.cost if error is not None else 0
    _settle(session, row.organization_id, task_id, was=TaskStatus.RUNNING, refund=refund, now=now)
    delivery_id = _event(session, task_id, status, now=now) if row.webhook_url else None
    return True, delivery_id


@dataclass(frozen=True)
class Ended:
    done: bool  # False: the task was already final (or is missing)
    was: TaskStatus | None = None
    delivery_id: str | None = None
    type: str = ""
    organization_id: str = ""


def finish(
    session: Session,
    task_id: str,
    status: TaskStatus,
    *,
    error: tuple[str, str] | None = None,
    now: datetime | None = None,
    retention_days: float = DEFAULT_RETENTION_DAYS,
) -> Ended:
    """End a queued or running task as ``failed`` or ``canceled``, whatever state its run is in.

    Plain statements that read neither the input nor the result: the end is
    recorded even when those are what broke. Refunds once (the task's flag,
    and the ledger's unique key as the backstop).
    """
    assert status in (TaskStatus.FAILED, TaskStatus.CANCELED)
    row = session.connection().execute(st.LOCK_TASK, {"p_id": task_id}).first()
    if row is None or TaskStatus(row.status).is_final:
        return Ended(done=False)
    return _end(
        session, task_id, row, status, error=error, now=now or utcnow(), retention_days=retention_days
    )


def expire(
    session: Session,
    task_id: str,
    *,
    now: datetime | None = None,
    retention_days: float = DEFAULT_RETENTION_DAYS,
) -> Ended:
    """Cancel a queued or running task whose deadline has passed (``deadline_exceeded``).

    Under the same row lock as every other end, so a run recording its
    result, a client's cancel or another sweep racing it ends the task one
    way only: whoever comes second finds it final (or not yet due) and does
    nothing.
    """
    now = now or utcnow()
    row = session.connection().execute(st.LOCK_TASK, {"p_id": task_id}).first()
    if row is None or TaskStatus(row.status).is_final or not _overdue(row, now):
        return Ended(done=False)
    return _end(
        session,
        task_id,
        row,
        TaskStatus.CANCELED,
        error=deadline_error(row.cancel_after),
        now=now,
        retention_days=retention_days,
    )


def deadline_error(cancel_after: int | None) -> tuple[str, str]:
    """The (code, message) of a task canceled because its cancelAfter passed."""
    return DEADLINE_EXCEEDED, f"The task was not finished within its cancelAfter of {cancel_after} s."


def _overdue(row: Any, now: datetime) -> bool:
    """The locked row's deadline has passed (a task without cancelAfter never is)."""
    return row.deadline_at is not None and row.deadline_at <= now


def _end(
    session: Session,
    task_id: str,
    row: Any,
    status: TaskStatus,
    *,
    error: tuple[str, str] | None,
    now: datetime,
    retention_days: float,
) -> Ended:
    """End the task whose row (``st.LOCK_TASK``) this transaction holds locked and found not final."""
    conn = session.connection()
    refund = row.cost if row.cost and not row.refunded else 0
    values: dict[str, Any] = {
        "status": status.value,
        "completed_at": now,
        "expires_at": now + timedelta(days=retention_days),
        "lease_expires_at": None,
        "refunded": bool(row.refunded or refund),
    }
    if error is not None:
        values["error_code"], values["error_message"] = error[0], error[1][:1000]
    conn.execute(update(st.TASKS).where(st.TASKS.c.id == task_id).values(**values))
    was = TaskStatus(row.status)
    _settle(session, row.organization_id, task_id, was=was, refund=refund, now=now)
    delivery_id = _event(session, task_id, status, now=now) if row.webhook_url else None
    return Ended(
        done=True, was=was, delivery_id=delivery_id, type=row.type, organization_id=row.organization_id
    )


def fail_task(
    session: Session, task_id: str, code: str, message: str, *, retention_days: float = DEFAULT_RETENTION_DAYS
) -> Ended:
    """The last resort of a run that raised where it should not have (claiming, decoding, recording)."""
    return finish(session, task_id, TaskStatus.FAILED, error=(code, message), retention_days=retention_days)


def cancel(
    session: Session, organization_id: str, task_id: str, *, retention_days: float = DEFAULT_RETENTION_DAYS
) -> tuple[Task, Ended]:
    """Cancel a waiting or running task; 404 for another organization's, 409 once final."""
    task = get_task(session, organization_id, task_id)
    ended = finish(
        session,
        task_id,
        TaskStatus.CANCELED,
        error=(CANCELED_BY_CLIENT, "The task was canceled by the client."),
        retention_days=retention_days,
    )
    session.refresh(task)
    if not ended.done:
        raise TaskAlreadyFinal(f"The task is already {task.status}.")
    return task, ended


def _settle(
    session: Session, org_id: str, task_id: str, *, was: TaskStatus, refund: int, now: datetime
) -> None:
    """The organization's side of a task's end: its counter, and the refund with its ledger row."""
    conn = session.connection()
    counters = st.ORG_ENDED_QUEUED if was == TaskStatus.QUEUED else st.ORG_ENDED_RUNNING
    conn.execute(counters, {"p_org": org_id, "p_refund": refund})
    if refund:
        # The ledger's unique (task_id, kind) is the backstop against a second refund.
        conn.execute(
            st.INSERT_LEDGER,
            {
                "organization_id": org_id,
                "task_id": task_id,
                "kind": "refund",
                "amount": refund,
                "created_at": now,
            },
        )


def _event(session: Session, task_id: str, status: TaskStatus, *, now: datetime) -> str | None:
    """The final event's delivery, with the task as it is now; its webhook status becomes pending.

    None when the task's ``webhook.events`` left this final event out.
    """
    task = event_task(session, task_id)
    if f"task.{status.value}" not in deliveries.wanted_events(task.webhook_events):
        return None
    delivery_id = deliveries.create_for_event(session, task, f"task.{status.value}", now=now)
    session.connection().execute(st.WEBHOOK_PENDING, {"p_id": task_id})
    return delivery_id


def event_task(session: Session, task_id: str) -> Task:
    """The task as its events show it, read in the caller's transaction (detached: read only).

    A stored value that cannot be decoded (a task accepted before the input
    limits) is shown as null rather than blocking the event.
    """
    row = session.connection().execute(st.EVENT_ROW, {"p_id": task_id}).one()
    task = st.detached(row)
    task.input, task.result = _loads_or_none(row.input_json), _loads_or_none(row.result_json)
    return task


def _loads_or_none(text: str | None) -> Any:
    try:
        return decode_input(text)
    except (ValueError, RecursionError):
        return None
