"""The SQL statements of a task's hot path, built once as Core.

Submission, claim and record run these thousands of times a second; building
an ORM statement and its cache key each time was most of their Python time
(``docs/performance.rst``, changes 5 - 9). Each is one conditional statement
that is its own row lock and status check.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, Text, bindparam, insert, inspect, or_, select, update
from sqlalchemy import cast as sql_cast

from app.models import CreditEntry, Organization, Task, TaskStatus, WebhookStatus

TASKS, ORGS, LEDGER = (cast(Table, m.__table__) for m in (Task, Organization, CreditEntry))
# ORM attribute -> column name: some differ (``task_metadata`` is ``metadata``).
TASK_COLUMN = {attr.key: attr.columns[0].name for attr in inspect(Task).column_attrs}
TASK_ATTR = {column: attr for attr, column in TASK_COLUMN.items()}
# Every column but the two JSON payloads; a run reads its input as JSON text
# (INPUT_TEXT), decoded after its claim has committed, so that an input that
# cannot be decoded is a recorded failure, not a claim that rolls back.
PLAIN_COLUMNS = [c for c in TASKS.c if c.name not in ("input", "result")]
INPUT_TEXT = sql_cast(TASKS.c.input, Text).label("input_json")
RESULT_TEXT = sql_cast(TASKS.c.result, Text).label("result_json")


def bind(name: str, column: str) -> Any:
    """A bound parameter typed like a tasks column (so UTC datetimes and JSON convert)."""
    return bindparam(name, type_=TASKS.c[column].type)


def detached(row: Any) -> Task:
    """A Task made from a row of plain columns: read it, never write through it."""
    return Task(**{TASK_ATTR[c.name]: row._mapping[c.name] for c in PLAIN_COLUMNS})


INSERT_TASK = insert(TASKS)
INSERT_LEDGER = insert(LEDGER)

# Checks both limits and takes both the credits and the queue place: exact
# under any concurrency, O(1) at any backlog.
TAKE_PLACE = (
    update(ORGS)
    .where(
        ORGS.c.id == bindparam("p_org"),
        ORGS.c.credits >= bindparam("p_cost"),
        ORGS.c.queued < ORGS.c.queue_limit,
    )
    .values(credits=ORGS.c.credits - bindparam("p_cost"), queued=ORGS.c.queued + 1)
    .returning(ORGS.c.concurrency_limit)
)

_START = {
    "status": TaskStatus.RUNNING.value,
    "attempts": TASKS.c.attempts + 1,
    "lease_expires_at": bind("p_lease", "lease_expires_at"),
}
CLAIM_QUEUED = (
    update(TASKS)
    .where(
        TASKS.c.id == bindparam("p_id"),
        TASKS.c.status == TaskStatus.QUEUED.value,
        # A task past its cancelAfter is not started: the claim finds no row
        # and cancels it under the lock instead (lifecycle.claim).
        or_(TASKS.c.deadline_at.is_(None), TASKS.c.deadline_at > bind("p_now", "deadline_at")),
    )
    .values(**_START, started_at=bind("p_now", "started_at"))  # a queued task has never started
    .returning(*PLAIN_COLUMNS, INPUT_TEXT)
)
# A running task whose run died (its lease expired): the next attempt.
TAKE_OVER = (
    update(TASKS)
    .where(TASKS.c.id == bindparam("p_id"), TASKS.c.status == TaskStatus.RUNNING.value)
    .values(**_START)
    .returning(*PLAIN_COLUMNS, INPUT_TEXT)
)
# What deciding a claim or an end needs, under the row lock, without the payloads.
LOCK_TASK = (
    select(
        TASKS.c.status,
        TASKS.c.organization_id,
        TASKS.c.type,
        TASKS.c.cost,
        TASKS.c.refunded,
        TASKS.c.webhook_url,
        TASKS.c.attempts,
        TASKS.c.lease_expires_at,
        TASKS.c.cancel_after,
        TASKS.c.deadline_at,
    )
    .where(TASKS.c.id == bindparam("p_id"))
    .with_for_update()
)
RENEW_LEASE = (
    update(TASKS)
    .where(
        TASKS.c.id == bindparam("p_id"),
        TASKS.c.status == TaskStatus.RUNNING.value,
        TASKS.c.attempts == bindparam("p_attempt"),
    )
    .values(lease_expires_at=bind("p_until", "lease_expires_at"))
)


def _record(failed: bool) -> Any:
    values: dict[str, Any] = {
        "status": (TaskStatus.FAILED if failed else TaskStatus.SUCCEEDED).value,
        "completed_at": bind("p_now", "completed_at"),
        "expires_at": bind("p_expires", "expires_at"),
        "lease_expires_at": None,
    }
    if failed:
        values["error_code"] = bind("p_code", "error_code")
        values["error_message"] = bind("p_message", "error_message")
        # A running task has never been refunded; a free one has nothing to give back.
        values["refunded"] = TASKS.c.cost > 0
    else:
        values["result"] = bind("p_result", "result")
    # Only the run holding the current attempt of a running task records.
    return (
        update(TASKS)
        .where(
            TASKS.c.id == bindparam("p_id"),
            TASKS.c.status == TaskStatus.RUNNING.value,
            TASKS.c.attempts == bindparam("p_attempt"),
        )
        .values(**values)
        .returning(TASKS.c.organization_id, TASKS.c.cost, TASKS.c.webhook_url)
    )


RECORD_SUCCEEDED, RECORD_FAILED = _record(False), _record(True)

# The organization's counters: every move of a task between statuses moves them
# in the same transaction, through these statements only.
ORG_STARTED = (
    update(ORGS)
    .where(ORGS.c.id == bindparam("p_org"))
    .values(queued=ORGS.c.queued - 1, running=ORGS.c.running + 1)
)
ORG_ENDED_RUNNING = (
    update(ORGS)
    .where(ORGS.c.id == bindparam("p_org"))
    .values(running=ORGS.c.running - 1, credits=ORGS.c.credits + bindparam("p_refund"))
)
ORG_ENDED_QUEUED = (
    update(ORGS)
    .where(ORGS.c.id == bindparam("p_org"))
    .values(queued=ORGS.c.queued - 1, credits=ORGS.c.credits + bindparam("p_refund"))
)

EVENT_ROW = select(*PLAIN_COLUMNS, INPUT_TEXT, RESULT_TEXT).where(TASKS.c.id == bindparam("p_id"))
WEBHOOK_PENDING = (
    update(TASKS)
    .where(TASKS.c.id == bindparam("p_id"))
    .values(webhook_status=WebhookStatus.PENDING.value, webhook_attempts=0)
)

# Flower's labels of released tasks (app.container): one read per publish,
# on the run path while TASK_EVENTS is on.
TASK_LABELS = select(TASKS.c.id, TASKS.c.type, TASKS.c.organization_id).where(
    TASKS.c.id.in_(bindparam("p_ids", expanding=True))
)
