"""Submitting tasks: validate, reserve credits, take a queue place and store them, in one transaction.

:func:`submit` stores one task (``POST /v1/tasks``), :func:`submit_many` a
batch (``POST /v1/tasks/batch``): each item judged by the same rules
(:func:`prepare`, :func:`_replay`, :func:`_refusal`) as if it came alone, in
order, and the accepted ones stored together.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import ids
from app.models import Organization, Task, TaskStatus, WebhookStatus
from app.models.base import utcnow
from app.services import statements as st
from app.services.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    QueueFull,
    ServiceError,
    ValidationFailed,
)
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
    cancel_after: int | None = None  # seconds, from the field or the Cancel-After header
    # webhook.events as stored (deliveries.stored_events); None: the three final events.
    webhook_events: str | None = None

    def fingerprint(self) -> str:
        """What makes two submissions "the same request" for an idempotency key.

        The type, the input, the webhook URL, the metadata and cancelAfter,
        compared as JSON values (key order and white space do not matter).
        cancelAfter joins the list only when given, so a request without it
        keeps the hash it had before cancelAfter existed: replaying a task
        stored then is still a replay, not a 422.
        """
        parts: list[Any] = [self.type, self.input, self.webhook_url, self.metadata]
        if self.cancel_after is not None:
            parts.append({"cancelAfter": self.cancel_after})  # named: unambiguous beside later options
        if self.webhook_events is not None:  # likewise only when given, normalized (order, repeats)
            parts.append({"webhookEvents": self.webhook_events})
        canonical = json.dumps(
            parts,
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


@dataclass(frozen=True)
class Prepared:
    """A submission that passed its type's checks: what storing it needs."""

    req: SubmitRequest
    input: Any  # as the type's schema loaded it
    fingerprint: str
    cost: int

    @property
    def key(self) -> str | None:
        return self.req.idempotency_key


def prepare(req: SubmitRequest, registry: Registry) -> Prepared:
    """The submission checked against its task type (400 when unknown or its input is bad)."""
    task_type = registry.get(req.type)
    if task_type is None:
        raise ValidationFailed({"type": [f"Unknown task type. Known types: {', '.join(registry.names())}."]})
    return Prepared(req, task_type.load_input(req.input), req.fingerprint(), task_type.cost)


def submit(
    session: Session,
    organization_id: str,
    req: SubmitRequest,
    *,
    registry: Registry,
    request_id: str | None = None,
) -> Submitted:
    """Store the task, or find the one its idempotency key names; the caller commits, then dispatches."""
    item = prepare(req, registry)

    if item.key is not None:
        existing = _live(session, _by_idempotency_key(session, organization_id, item.key))
        if existing is not None:
            return _replay(existing, item)

    now = utcnow()
    if item.key is None:
        # No unique key to race for: no savepoint needed.
        task, concurrency_limit = _insert(session, organization_id, item, now, request_id)
        return Submitted(task=task, created=True, concurrency_limit=concurrency_limit)
    try:
        # The task INSERT comes first, so a request that loses an idempotency
        # race fails before it takes credits or a queue place; the savepoint
        # is there because on PostgreSQL a failed statement aborts the whole
        # transaction, and this one still has to read the winner's task.
        with session.begin_nested():
            task, concurrency_limit = _insert(session, organization_id, item, now, request_id)
    except IntegrityError:
        # Another request claimed this idempotency key first and has
        # committed (the unique index made us wait for it): replay it.
        existing = _by_idempotency_key(session, organization_id, item.key)
        if existing is None:
            raise
        return _replay(existing, item)
    return Submitted(task=task, created=True, concurrency_limit=concurrency_limit)


def _insert(
    session: Session,
    organization_id: str,
    item: Prepared,
    now: datetime,
    request_id: str | None,
) -> tuple[Task, int]:
    values = _task_values(organization_id, item, ids.task_id(), now, request_id)
    task = Task(**values)  # not added to the session: it is only represented
    conn = session.connection()
    conn.execute(st.INSERT_TASK, _columns(values))
    if item.cost:
        conn.execute(st.INSERT_LEDGER, _reserve(organization_id, task.id, item.cost, now))
    # The organization's row last: on PostgreSQL its lock, which every
    # submission of the organization waits for, is then held only for this
    # statement and the commit. A refusal rolls the whole transaction back.
    taken = conn.execute(st.TAKE_PLACE, {"p_org": organization_id, "p_cost": item.cost}).first()
    if taken is None:
        org = session.get(Organization, organization_id, populate_existing=True)
        assert org is not None
        # Read after the refusal, the row may have moved on; it refused all the same.
        raise _refusal(org.credits, org.queued, org.queue_limit, item.cost) or QueueFull(
            org.queued, org.queue_limit
        )  # the use case sets Retry-After from Redis
    return task, int(taken[0])


def _task_values(
    organization_id: str, item: Prepared, task_id: str, now: datetime, request_id: str | None
) -> dict[str, Any]:
    """A new task's row, by ORM attribute."""
    req = item.req
    return {
        "id": task_id,
        "organization_id": organization_id,
        "type": req.type,
        "status": TaskStatus.QUEUED.value,
        "input": item.input,
        "task_metadata": req.metadata,
        "idempotency_key": req.idempotency_key,
        "request_hash": item.fingerprint,
        "cost": item.cost,
        "refunded": False,
        "webhook_url": req.webhook_url,
        "webhook_status": WebhookStatus.NONE.value,
        "webhook_attempts": 0,
        "attempts": 0,
        "request_id": request_id,
        "created_at": now,
        "cancel_after": req.cancel_after,
        "webhook_events": req.webhook_events if req.webhook_url else None,
        # The instant the sweep (and a claim) compare with, on the task's own clock.
        "deadline_at": None if req.cancel_after is None else now + timedelta(seconds=req.cancel_after),
    }


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    return {st.TASK_COLUMN[k]: v for k, v in values.items()}


def _reserve(organization_id: str, task_id: str, cost: int, now: datetime) -> dict[str, Any]:
    """The ledger row of a task's reservation."""
    return {
        "organization_id": organization_id,
        "task_id": task_id,
        "kind": "reserve",
        "amount": -cost,
        "created_at": now,
    }


def _refusal(
    credits: int, queued: int, queue_limit: int, cost: int
) -> InsufficientCredits | QueueFull | None:
    """Why a task of ``cost`` does not fit the organization's credits and queue now; None when it fits.

    The rule of ``statements.TAKE_PLACE``, in Python: credits first, then the queue.
    """
    if credits < cost:
        return InsufficientCredits(balance=credits, cost=cost)
    if queued >= queue_limit:
        return QueueFull(queued, queue_limit)  # the use case sets Retry-After from Redis
    return None


def _by_idempotency_key(session: Session, organization_id: str, key: str) -> Task | None:
    return session.execute(
        select(Task).where(Task.organization_id == organization_id, Task.idempotency_key == key)
    ).scalar_one_or_none()


def _live(session: Session, task: Task | None) -> Task | None:
    """The task holding a key, unless it is expired.

    GET and list already say an expired task does not exist: its key is free
    again. It is deleted now (retention would soon) so a new task can have it.
    """
    if task is not None and is_expired(task):
        delete_tasks(session, [task.id])
        return None
    return task


def _replay(existing: Task, item: Prepared) -> Submitted:
    if existing.request_hash != item.fingerprint:
        assert item.key is not None
        raise IdempotencyConflict(item.key)
    return Submitted(task=existing, created=False)


# -- a batch -------------------------------------------------------------------------------

# Every fresh task of a batch fits: all their credits and queue places at once
# (each prefix of the batch then fits too). Exact as TAKE_PLACE is.
TAKE_PLACES = (
    update(st.ORGS)
    .where(
        st.ORGS.c.id == bindparam("p_org"),
        st.ORGS.c.credits >= bindparam("p_cost"),
        st.ORGS.c.queued + bindparam("p_count") <= st.ORGS.c.queue_limit,
    )
    .values(
        credits=st.ORGS.c.credits - bindparam("p_cost"),
        queued=st.ORGS.c.queued + bindparam("p_count"),
    )
    .returning(st.ORGS.c.concurrency_limit)
)
# Some do not: the row under its lock, judged item by item, then moved by what was accepted.
# FOR NO KEY UPDATE, not FOR UPDATE: the batch's task and ledger inserts
# already hold FOR KEY SHARE on this row (their foreign keys), and so do a
# concurrent batch's; FOR UPDATE conflicts with KEY SHARE, so two batches
# each waited for the other's share lock: a deadlock PostgreSQL broke after
# deadlock_timeout with a 503 (seen in CI). NO KEY UPDATE does not conflict
# with KEY SHARE and still serializes the batches judging this row.
LOCK_ORG = (
    select(st.ORGS.c.credits, st.ORGS.c.queued, st.ORGS.c.queue_limit, st.ORGS.c.concurrency_limit)
    .where(st.ORGS.c.id == bindparam("p_org"))
    .with_for_update(key_share=True)
)
MOVE_ORG = (
    update(st.ORGS)
    .where(st.ORGS.c.id == bindparam("p_org"))
    .values(
        credits=st.ORGS.c.credits - bindparam("p_cost"),
        queued=st.ORGS.c.queued + bindparam("p_count"),
    )
)
KEY_CHUNK = 500  # idempotency keys looked up per statement


def submit_many(
    session: Session,
    organization_id: str,
    items: Sequence[Prepared | ServiceError],
    *,
    request_id: str | None = None,
) -> tuple[list[Submitted | ServiceError], int]:
    """Judge each item as if it were submitted alone, in order; store the accepted ones.

    ``items`` holds the :func:`prepare`-d submissions, or the error an item
    already got. Returns, per item, the new or replayed task or its error,
    and the organization's concurrency limit (for dispatch). All in the
    caller's one transaction, so a crash leaves the whole batch or nothing.
    The tasks returned are detached from the session: the caller can
    represent them after its commit.

    Within the batch, a key used by an earlier accepted item is a replay of
    that item's task (or 422 for a different request); a key whose earlier
    item was refused is free, as it would be had they come one by one.

    The round trips do not grow with the batch, save for a lost idempotency
    race: the keys are looked up in one statement, the tasks and their
    ledger rows inserted in one statement each, and the organization's row
    updated once. The statements come in :func:`submit`'s order, so its
    locks are taken in the same order and neither can deadlock the other:
    the keyed tasks first (in key order, so that two batches sharing keys
    wait for each other instead of deadlocking), then the other tasks and
    the ledger rows, and the organization's row last, its lock held only
    for that statement and the commit. When not every task fits, the row is
    locked, each item judged in turn, and the rows of those refused deleted.
    """
    out: list[Submitted | ServiceError | None] = [None] * len(items)
    prepared: dict[int, Prepared] = {}  # in item order
    for i, entry in enumerate(items):
        if isinstance(entry, ServiceError):
            out[i] = entry
        else:
            prepared[i] = entry
    if not prepared:
        return _done(out), 0

    known = _by_keys(session, organization_id, {p.key for p in prepared.values() if p.key is not None})
    # A row for each item that may create a task: every unkeyed item, and the
    # first item of each key no stored task holds. Ids in item order.
    now = utcnow()
    task_ids = iter(sorted(ids.task_id() for _ in prepared))
    rows: dict[int, dict[str, Any]] = {}
    holders: dict[str, int] = {}
    for i, item in prepared.items():
        if item.key is None or (item.key not in known and item.key not in holders):
            rows[i] = _task_values(organization_id, item, next(task_ids), now, request_id)
            if item.key is not None:
                holders[item.key] = i
    for key in _insert_keyed(session, [rows[holders[k]] for k in sorted(holders)]):
        # Lost to a concurrent submission that has committed: its task holds the key.
        del rows[holders.pop(key)]
        winner = _by_idempotency_key(session, organization_id, key)
        if winner is None:
            raise RuntimeError(f"idempotency key {key!r} is taken by no task")
        session.expunge(winner)
        known[key] = winner
    if not rows:
        for i, item in prepared.items():  # each a replay or a conflict
            assert item.key is not None
            out[i] = _judged_replay(known[item.key], item)
        return _done(out), 0
    _insert_rest(session, organization_id, rows.values(), now)

    # Each item's answer should every task fit, the usual case.
    tasks = {i: Task(**values) for i, values in rows.items()}  # represented only, never added
    for i, item in prepared.items():
        if i in tasks:
            out[i] = Submitted(task=tasks[i], created=True)
        else:
            # A stored task, or an earlier row of the batch, holds the key.
            assert item.key is not None
            out[i] = _judged_replay(known.get(item.key) or tasks[holders[item.key]], item)
    cost = sum(t.cost for t in tasks.values())
    params = {"p_org": organization_id, "p_cost": cost, "p_count": len(rows)}
    taken = session.connection().execute(TAKE_PLACES, params).first()
    if taken is not None:
        return _done(out), int(taken[0])
    limit = _judge_in_turn(session, organization_id, prepared, known, rows, tasks, out, now, request_id)
    return _done(out), limit


def _insert_rest(
    session: Session, organization_id: str, rows: Iterable[dict[str, Any]], now: datetime
) -> None:
    """Insert the tasks without a key (the keyed are in already) and every task's reservation."""
    unkeyed: list[dict[str, Any]] = []
    reserves: list[dict[str, Any]] = []
    for values in rows:
        if values["idempotency_key"] is None:
            unkeyed.append(_columns(values))
        if values["cost"]:
            reserves.append(_reserve(organization_id, values["id"], values["cost"], now))
    conn = session.connection()
    if unkeyed:
        conn.execute(st.INSERT_TASK, unkeyed)
    if reserves:
        conn.execute(st.INSERT_LEDGER, reserves)


def _judge_in_turn(
    session: Session,
    organization_id: str,
    prepared: dict[int, Prepared],
    known: dict[str, Task],
    rows: dict[int, dict[str, Any]],
    tasks: dict[int, Task],
    out: list[Submitted | ServiceError | None],
    now: datetime,
    request_id: str | None,
) -> int:
    """Not every task fits: each item against the locked row, in order, its answer in ``out``.

    The rows of refused items are deleted, with their reservations; the
    organization's row takes what was accepted. Returns its concurrency limit.
    """
    conn = session.connection()
    credits, queued, queue_limit, concurrency_limit = conn.execute(LOCK_ORG, {"p_org": organization_id}).one()
    by_key: dict[str, Task] = {}  # key -> the accepted item's task
    kept: set[int] = set()
    late: list[dict[str, Any]] = []  # accepted items that have no row yet
    taken_cost = 0
    for i, item in prepared.items():
        holder = None if item.key is None else known.get(item.key) or by_key.get(item.key)
        if holder is not None:
            out[i] = _judged_replay(holder, item)
            continue
        refused = _refusal(credits, queued, queue_limit, item.cost)
        if refused is not None:
            out[i] = refused
            continue
        credits, queued, taken_cost = credits - item.cost, queued + 1, taken_cost + item.cost
        if i in rows:
            kept.add(i)
            task = tasks[i]
        else:
            # A key whose first item was refused: this later item takes it.
            values = _task_values(organization_id, item, ids.task_id(), now, request_id)
            late.append(values)
            task = Task(**values)
        out[i] = Submitted(task=task, created=True)
        if item.key is not None:
            by_key[item.key] = task
    refused_ids = [values["id"] for i, values in rows.items() if i not in kept]
    if refused_ids:
        conn.execute(delete(st.LEDGER).where(st.LEDGER.c.task_id.in_(refused_ids)))
        conn.execute(delete(st.TASKS).where(st.TASKS.c.id.in_(refused_ids)))
    if late:
        # After the delete: the refused row held the key until then.
        conn.execute(st.INSERT_TASK, [_columns(v) for v in late])
        _insert_rest(session, organization_id, late, now)  # their reservations
    if kept or late:
        params = {"p_org": organization_id, "p_cost": taken_cost, "p_count": len(kept) + len(late)}
        conn.execute(MOVE_ORG, params)
    return int(concurrency_limit)


def _judged_replay(existing: Task, item: Prepared) -> Submitted | ServiceError:
    try:
        return _replay(existing, item)
    except IdempotencyConflict as exc:
        return exc


def _by_keys(session: Session, organization_id: str, keys: set[str]) -> dict[str, Task]:
    """The live tasks holding these keys (expired ones are deleted: their keys are free)."""
    found: list[Task] = []
    ordered = sorted(keys)
    for start in range(0, len(ordered), KEY_CHUNK):
        chunk = ordered[start : start + KEY_CHUNK]
        found.extend(
            session.execute(
                select(Task).where(Task.organization_id == organization_id, Task.idempotency_key.in_(chunk))
            ).scalars()
        )
    expired = {t.id for t in found if is_expired(t)}
    if expired:
        delete_tasks(session, sorted(expired))
    live = {t.idempotency_key: t for t in found if t.idempotency_key is not None and t.id not in expired}
    for task in live.values():
        session.expunge(task)  # read, and represented after the commit
    return live


def _insert_keyed(session: Session, rows: list[dict[str, Any]]) -> list[str]:
    """Insert tasks that have idempotency keys; returns the keys lost to a race.

    One statement in a savepoint; should a concurrent submission have
    claimed one of the keys, that savepoint is rolled back and each row is
    inserted in its own, so one lost key does not undo the others.
    """
    if not rows:
        return []
    try:
        with session.begin_nested():
            session.connection().execute(st.INSERT_TASK, [_columns(r) for r in rows])
        return []
    except IntegrityError:
        pass
    lost: list[str] = []
    for row in rows:
        try:
            with session.begin_nested():
                session.connection().execute(st.INSERT_TASK, _columns(row))
        except IntegrityError:
            lost.append(row["idempotency_key"])
    return lost


def _done(out: list[Submitted | ServiceError | None]) -> list[Submitted | ServiceError]:
    assert all(o is not None for o in out)
    return [o for o in out if o is not None]


def retry_after(drain_rate: float) -> int:
    """Seconds until a queue place is likely free, from the recent drain rate (tasks/s)."""
    if drain_rate <= 1e-6:
        return 60
    return max(1, min(3600, math.ceil(1.0 / drain_rate)))
