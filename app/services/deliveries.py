"""Webhook deliveries: one per event, one attempt row per try.

An attempt is claimed in one transaction, sent with no transaction open, and
recorded in a second one; the claim (``claimed_until``) and the conditional
status checks make sure one attempt is sent once and a delivery is marked
``delivered`` once, however many copies of its message arrive.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from app import ids
from app.models import DeliveryStatus, Organization, Task, WebhookAttempt, WebhookDelivery, WebhookStatus
from app.models.base import utcnow
from app.services.errors import NothingToDeliver
from app.services.representation import FINAL_EVENTS, WEBHOOK_EVENTS, iso, represent, webhook_events

PENDING, DELIVERED, FAILED = DeliveryStatus.PENDING, DeliveryStatus.DELIVERED, DeliveryStatus.FAILED
RESPONSE_READ_LIMIT = 4096  # bytes of a receiver's answer we read; never stored


# What a submission may ask for in ``webhook.events``, in the order they are stored;
# FINAL_EVENTS (imported with it) end a task, and the task's ``webhook`` summary
# follows their delivery.
EVENTS = WEBHOOK_EVENTS


def wanted_events(stored: str | None) -> frozenset[str]:
    """The events a task's webhook receives, from its ``webhook_events`` column (None: the default)."""
    return frozenset(webhook_events(stored))


def stored_events(events: list[str] | None) -> str | None:
    """``webhook.events`` as the column stores it: each once, in :data:`EVENTS` order; None: default."""
    if events is None:
        return None
    return ",".join(e for e in EVENTS if e in set(events))


def create_for_event(session: Session, task: Task, event_type: str, *, now: datetime, seq: int = 0) -> str:
    """Record the event's delivery (``pending``, due now); returns its webhook id.

    A final event's delivery becomes the task's ``webhook`` summary (pending,
    0 attempts); a ``task.started`` or ``task.progress`` one does not: the
    summary says how the result's delivery went. ``seq``: a progress
    delivery's report number (one delivery per stored report).
    """
    assert task.webhook_url
    if event_type in FINAL_EVENTS:
        task.webhook_status = WebhookStatus.PENDING
        task.webhook_attempts = 0
    payload = {"type": event_type, "timestamp": iso(now), "data": represent(task)}
    delivery = WebhookDelivery(
        id=ids.webhook_id(),
        task_id=task.id,
        organization_id=task.organization_id,
        event_type=event_type,
        seq=seq,
        url=task.webhook_url,
        payload=payload,
        status=PENDING,
        attempts=0,
        max_attempts=5,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    session.flush()
    return delivery.id


def sign(secrets: list[str], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space-separated."""
    message = f"{webhook_id}.{timestamp}.".encode() + body
    out = []
    for secret in secrets:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        digest = hmac.new(key, message, hashlib.sha256).digest()
        out.append("v1," + base64.b64encode(digest).decode())
    return " ".join(out)


def body_of(payload: Any) -> bytes:
    """A delivery's payload as the bytes that are signed and sent."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class AttemptPlan:
    delivery_id: str
    attempt: int
    url: str
    body: bytes
    secrets: list[str]
    created_at: datetime
    task_id: str = ""
    request_id: str | None = None
    organization_id: str = ""


# An attempt's statements, built once, as Core (see the run's in tasks.py).
_D = cast(Table, WebhookDelivery.__table__)
_ORGS = cast(Table, Organization.__table__)
_TASKS = cast(Table, Task.__table__)
_ATTEMPTS = cast(Table, WebhookAttempt.__table__)
_NOW = bindparam("p_now", type_=_D.c.claimed_until.type)
# One conditional UPDATE is the row lock, the checks and the claim: the
# delivery is pending, no other worker is sending it right now, and it is
# due (an early copy is left to the scheduled message or the sweep).
_CLAIM = (
    update(_D)
    .where(
        _D.c.id == bindparam("p_id"),
        _D.c.status == PENDING,
        or_(_D.c.claimed_until.is_(None), _D.c.claimed_until <= _NOW),
        or_(
            _D.c.next_attempt_at.is_(None),
            _D.c.next_attempt_at <= bindparam("p_due", type_=_D.c.next_attempt_at.type),
        ),
    )
    .values(claimed_until=bindparam("p_until", type_=_D.c.claimed_until.type))
    .returning(_D.c.attempts, _D.c.url, _D.c.payload, _D.c.created_at, _D.c.task_id, _D.c.organization_id)
)
# The signing secrets and the task's request id, in one read.
_SIGNING = select(
    _ORGS.c.webhook_secret,
    _ORGS.c.previous_webhook_secret,
    _ORGS.c.previous_webhook_secret_expires_at,
    select(_TASKS.c.request_id).where(_TASKS.c.id == bindparam("p_task")).scalar_subquery(),
).where(_ORGS.c.id == bindparam("p_org"))

# What recording an attempt reads and writes.
_DECISION = (
    select(_D.c.status, _D.c.attempts, _D.c.max_attempts, _D.c.task_id, _D.c.event_type)
    .where(_D.c.id == bindparam("p_id"))
    .with_for_update()
)
_INSERT_ATTEMPT = insert(_ATTEMPTS)
_TASK_WEBHOOK = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("p_task"))
    .values(webhook_status=bindparam("p_status"), webhook_attempts=bindparam("p_attempts"))
)


def hold_seconds(timeout_seconds: float) -> float:
    """How long a claimed attempt is its sender's: its deadline, and time to record it."""
    return timeout_seconds + 30


def claim_attempt(
    session: Session,
    delivery_id: str,
    *,
    hold_seconds: float,
    now: datetime | None = None,
    early_tolerance: float = 1.0,
) -> AttemptPlan | None:
    """Claim the next attempt, or None when it is not due or not ours to send."""
    from app.services.organizations import signing_secrets

    now = now or utcnow()
    conn = session.connection()
    claimed = conn.execute(
        _CLAIM,
        {
            "p_id": delivery_id,
            "p_now": now,
            "p_due": now + timedelta(seconds=early_tolerance),
            "p_until": now + timedelta(seconds=hold_seconds),
        },
    ).first()
    if claimed is None:
        return None
    current, previous, previous_expires_at, request_id = conn.execute(
        _SIGNING, {"p_org": claimed.organization_id, "p_task": claimed.task_id}
    ).one()
    return AttemptPlan(
        delivery_id=delivery_id,
        attempt=claimed.attempts + 1,
        url=claimed.url,
        body=body_of(claimed.payload),
        secrets=signing_secrets(current, previous, previous_expires_at, now=now),
        created_at=claimed.created_at,
        task_id=claimed.task_id,
        request_id=request_id,
        organization_id=claimed.organization_id,
    )


def defer_attempt(
    session: Session, delivery_id: str, *, until: datetime | None = None, claimed: bool = False
) -> bool:
    """Record that a due attempt was not sent (no slot, or its host's circuit is open).

    Not an attempt: the count, the retry schedule and the status stay.
    ``claimed``: the caller holds the attempt's claim and gives it back. With
    ``until`` the delivery is next due then (the circuit's next probe), so the
    sweep does not publish it again in the meantime; without it, it stays due
    and waits in Redis for a slot. False when nothing was written.
    """
    values: dict[str, Any] = {}
    conditions = [_D.c.id == delivery_id, _D.c.status == PENDING]
    if claimed:
        values["claimed_until"] = None
    else:  # never move an attempt another sender holds
        conditions.append(or_(_D.c.claimed_until.is_(None), _D.c.claimed_until <= utcnow()))
    if until is not None:
        values["next_attempt_at"] = until
    if not values:
        return False
    done = session.connection().execute(update(_D).where(*conditions).values(**values))
    return bool(done.rowcount)


def bring_forward(session: Session, delivery_ids: list[str], *, now: datetime | None = None) -> None:
    """Make deferred deliveries due now (their circuit closed, or one is its probe)."""
    if delivery_ids:
        session.connection().execute(
            update(_D)
            .where(_D.c.id.in_(delivery_ids), _D.c.status == PENDING)
            .values(next_attempt_at=now or utcnow())
        )


@dataclass(frozen=True)
class Route:
    organization_id: str
    url: str
    task_id: str
    claimable: bool  # pending, due, and nobody's attempt right now


def route_of(session: Session, delivery_id: str, *, early_tolerance: float = 1.0) -> Route | None:
    """Where a delivery goes and whether its attempt could be claimed now, without claiming it.

    The sender takes the attempt's slots (and asks its circuit) from this,
    before the claim: a delivery that must wait is parked in Redis while no
    claim of ours is on it, so whoever hands it on next can claim it.
    """
    row = (
        session.connection()
        .execute(
            select(
                _D.c.organization_id,
                _D.c.url,
                _D.c.task_id,
                _D.c.status,
                _D.c.claimed_until,
                _D.c.next_attempt_at,
            ).where(_D.c.id == delivery_id)
        )
        .first()
    )
    if row is None:
        return None
    now = utcnow()
    claimable = (
        row.status == PENDING
        and (row.claimed_until is None or row.claimed_until <= now)
        and (row.next_attempt_at is None or row.next_attempt_at <= now + timedelta(seconds=early_tolerance))
    )
    return Route(row.organization_id, row.url, row.task_id, claimable)


@dataclass(frozen=True)
class AttemptOutcome:
    outcome: str  # delivered | http_error | gone | redirect | timeout | connection_error | ...
    response_status: int | None
    duration_ms: int
    error: str | None


def record_attempt(
    session: Session,
    plan: AttemptPlan,
    result: AttemptOutcome,
    *,
    retry_base_seconds: float,
    now: datetime | None = None,
) -> float | None:
    """Store the attempt and move the delivery on; returns the retry countdown, if any."""
    now = now or utcnow()
    conn = session.connection()
    # Only the columns the decision needs, under the row lock: the payload
    # and the task's input and result are not loaded to record an attempt.
    row = conn.execute(_DECISION, {"p_id": plan.delivery_id}).one()
    conn.execute(
        _INSERT_ATTEMPT,
        {
            "delivery_id": plan.delivery_id,
            "attempt": plan.attempt,
            "at": now,
            "outcome": result.outcome,
            "response_status": result.response_status,
            "duration_ms": result.duration_ms,
            "error": (result.error or None) and result.error[:200],
        },
    )
    status, attempts = row.status, row.attempts
    values: dict[str, Any] = {"claimed_until": None}
    countdown: float | None = None
    if status == PENDING and attempts < plan.attempt:
        attempts = values["attempts"] = plan.attempt
        if result.outcome == DELIVERED:
            status = DELIVERED
            values.update(status=status, delivered_at=now, next_attempt_at=None)
        elif result.outcome == "gone" or attempts >= row.max_attempts:
            status = FAILED
            values.update(status=status, next_attempt_at=None)
        else:
            countdown = retry_delay(retry_base_seconds, attempts)
            values["next_attempt_at"] = now + timedelta(seconds=countdown)
    conn.execute(update(_D).where(_D.c.id == plan.delivery_id).values(**values))
    if row.event_type in FINAL_EVENTS:  # the summary is the result's delivery, not a progress one
        conn.execute(_TASK_WEBHOOK, {"p_task": row.task_id, "p_status": status, "p_attempts": attempts})
    return countdown


def record_error(
    session: Session, delivery_id: str, error: str, *, retry_base_seconds: float, now: datetime | None = None
) -> float | None:
    """Record an attempt that raised before or after sending (claim, payload, record) as failed.

    It counts as one of the delivery's attempts, retried on the usual
    schedule and failed after the last: a delivery that cannot be sent ends,
    instead of staying pending for the sweep to try again forever.
    """
    attempts = session.connection().execute(select(_D.c.attempts).where(_D.c.id == delivery_id)).scalar()
    if attempts is None:
        return None
    plan = AttemptPlan(
        delivery_id=delivery_id,
        attempt=attempts + 1,
        url="",
        body=b"",
        secrets=[],
        created_at=now or utcnow(),
    )
    outcome = AttemptOutcome("error", None, 0, error[:200])
    return record_attempt(session, plan, outcome, retry_base_seconds=retry_base_seconds, now=now)


def retry_delay(base: float, failed_attempts: int) -> float:
    """~base, 2*base, 4*base, 8*base after the 1st, 2nd, 3rd, 4th failure, with ±5% jitter."""
    delay = base * 2 ** (failed_attempts - 1)
    return float(delay * random.uniform(0.95, 1.05))


def redeliver(session: Session, task: Task, *, now: datetime | None = None) -> list[str]:
    """Send every event of the task again now, with the same webhook ids."""
    now = now or utcnow()
    rows = list(
        session.execute(
            select(WebhookDelivery)
            .where(WebhookDelivery.task_id == task.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalars()
    )
    if not rows:
        if not task.webhook_url:
            raise NothingToDeliver(
                "The task was submitted without a webhook URL, so it has no webhook event to deliver."
            )
        raise NothingToDeliver(
            "The task has not finished, so it has no webhook event yet; events are "
            "sent when it reaches succeeded, failed or canceled."
        )
    for delivery in rows:
        if delivery.status == PENDING:
            # Already on its way: bring its next attempt forward.
            delivery.next_attempt_at = now
            continue
        delivery.status = PENDING
        delivery.max_attempts = delivery.attempts + 1
        delivery.next_attempt_at = now
        delivery.claimed_until = None
    if any(d.event_type in FINAL_EVENTS for d in rows):
        task.webhook_status = WebhookStatus.PENDING
    return [d.id for d in rows]


def list_for_task(session: Session, task_id: str) -> list[dict[str, Any]]:
    deliveries = list(
        session.execute(
            select(WebhookDelivery)
            .where(WebhookDelivery.task_id == task_id)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        ).scalars()
    )
    attempts: dict[str, list[WebhookAttempt]] = {d.id: [] for d in deliveries}
    if deliveries:
        for a in session.execute(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(list(attempts)))
            .order_by(WebhookAttempt.attempt, WebhookAttempt.id)
        ).scalars():
            attempts[a.delivery_id].append(a)
    return [
        {
            "webhookId": d.id,
            "event": d.event_type,
            "eventType": d.event_type,  # its name before spec 1.1, for older clients
            "url": d.url,
            "status": d.status,
            "attempts": [
                {
                    "attempt": a.attempt,
                    "at": iso(a.at),
                    "outcome": a.outcome,
                    "responseStatus": a.response_status,
                    "durationMs": a.duration_ms,
                    "error": a.error,
                }
                for a in attempts[d.id]
            ],
        }
        for d in deliveries
    ]


def send_attempt(plan: AttemptPlan, *, timeout: float, allow_private: bool) -> AttemptOutcome:
    """POST the event once, signed for this attempt; the receiver's body is never kept."""
    from app.services import outbound

    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "Waybill-Webhooks/1",
        "webhook-id": plan.delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(plan.secrets, plan.delivery_id, timestamp, plan.body),
    }
    started = time.monotonic()
    try:
        response = outbound.request(
            "POST",
            plan.url,
            headers=headers,
            body=plan.body,
            timeout=timeout,
            max_bytes=RESPONSE_READ_LIMIT,
            allow_private=allow_private,
        )
    except outbound.UnsafeTarget as exc:
        return AttemptOutcome("refused", None, _ms(started), f"unsafe_target: {exc}"[:200])
    except outbound.OutboundError as exc:
        return AttemptOutcome(exc.kind, None, _ms(started), exc.kind)
    except Exception as exc:
        # Whatever else went wrong is this attempt's failure, recorded and
        # retried like any other: never an exception that leaves the delivery
        # pending with no attempt for the sweep to send again forever.
        return AttemptOutcome("error", None, _ms(started), f"{type(exc).__name__}: {exc}"[:200])
    status = response.status
    if 200 <= status < 300:
        return AttemptOutcome(DELIVERED, status, response.elapsed_ms, None)
    if status == 410:
        return AttemptOutcome("gone", status, response.elapsed_ms, "http_410")
    if 300 <= status < 400:
        return AttemptOutcome("redirect", status, response.elapsed_ms, f"http_{status}")
    return AttemptOutcome("http_error", status, response.elapsed_ms, f"http_{status}")


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
