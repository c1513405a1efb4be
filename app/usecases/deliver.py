"""Deliver one webhook attempt: claim it, send it with no transaction open, record it.

Any exception of an attempt -- in the exchange (``send_attempt`` turns those
into outcomes), or in claiming or recording it -- ends as a recorded failed
attempt on the usual retry schedule: a delivery never stays pending with no
attempt for the sweep to try again forever. Only a database that is away
propagates, for the Celery task to retry.

Between the claim and the send, an attempt is *admitted* (docs/webhooks.rst,
"Isolation between organizations and hosts"): its host's circuit must let it
through (:mod:`app.services.circuits`) and it must take a slot of its
organization and of its host (:mod:`app.services.delivery_slots`). One that is
not admitted is *deferred*: its claim is given back without an attempt, and
Redis holds it until a slot frees or the circuit closes. Redis away: every
attempt is admitted, as before isolation existed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from app import metrics
from app.container import Waybill
from app.db import is_transient
from app.models import DeliveryStatus
from app.models.base import utcnow
from app.services import deliveries
from app.services.circuits import Circuits, CircuitSettings, host_of
from app.services.delivery_slots import DeliverySlots, SlotSettings
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.worker")

_REDIS_AWAY = (redis.RedisError, RuntimeError, OSError)


@dataclass(frozen=True)
class Admission:
    send: bool
    reason: str = ""  # when deferred: organization_limit | host_limit | circuit_open
    until_ms: int = 0  # circuit_open: when the delivery is next due (the next probe)
    host: str = ""
    member: str = ""  # the slots held ("": none, Redis was away)
    probe: bool = False
    token: str = ""  # the probe lock's, when this attempt is the probe


def _isolation(wb: Waybill) -> tuple[Circuits, DeliverySlots]:
    """The circuit and slot verbs on the dispatch Redis (RuntimeError: none configured)."""
    s = wb.settings
    hold = deliveries.hold_seconds(s.webhook_timeout_seconds)
    client = wb.redis
    return (
        Circuits(
            client,
            CircuitSettings(
                failures=s.webhook_circuit_failures,
                cooldown_seconds=s.webhook_circuit_cooldown_seconds,
                max_cooldown_seconds=s.webhook_circuit_max_seconds,
                probe_hold_seconds=hold,
            ),
        ),
        DeliverySlots(
            client,
            SlotSettings(
                per_organization=s.webhook_max_per_organization,
                per_host=s.webhook_max_per_host,
                lease_seconds=hold,
            ),
        ),
    )


# How many parked deliveries in a row a sender that frees a slot sends itself
# (with the slot reserved for it) before it hands the next to the queue: it
# saves the next one a queue hop, and keeps a result's first attempts going
# out from the tasks worker while no webhooks worker is free; bounded, so a
# chain of slow receivers holds one sender for a few timeouts at most.
HAND_OFFS = 4


def deliver(wb: Waybill, delivery_id: str, *, hand_offs: int = HAND_OFFS) -> str:
    """The attempt's outcome (``delivered``, ``http_error``, ``error``...), ``deferred`` or ``skipped``.

    Admission comes before the claim: a delivery that must wait is parked in
    Redis with no claim of ours on it, so the sender that hands it on next
    (its turn came, or its circuit closed) can claim it at once.
    """
    try:
        with wb.db.read_session() as session:
            route = deliveries.route_of(session, delivery_id)
    except Exception as exc:
        if is_transient(exc):
            raise
        return _failed(wb, delivery_id, exc)
    if route is None:
        return "skipped"
    if not route.claimable:
        _drop_reservation(wb, route, delivery_id)
        return "skipped"  # not due, or another worker holds it, or it ended
    admission = _admit(wb, delivery_id, route.organization_id, route.url, enlist=True)
    if not admission.send:
        return _deferred(wb, delivery_id, route.organization_id, route.task_id, admission, claimed=False)
    try:
        with UnitOfWork(wb.db) as uow:
            plan = deliveries.claim_attempt(
                uow.session,
                delivery_id,
                hold_seconds=deliveries.hold_seconds(wb.settings.webhook_timeout_seconds),
            )
    except Exception as exc:
        _publish(wb, _settle(wb, delivery_id, route.organization_id, admission, None))
        if is_transient(exc):
            raise
        return _failed(wb, delivery_id, exc)
    if plan is None:  # another copy claimed it between our read and our claim
        _publish(wb, _settle(wb, delivery_id, route.organization_id, admission, None))
        return "skipped"
    return _send_admitted(wb, plan, admission, hand_offs)


def send_claimed(wb: Waybill, plan: deliveries.AttemptPlan, *, hand_offs: int = HAND_OFFS) -> str:
    """Admit an attempt already claimed, send it and record it.

    Claimed in the transaction that recorded a result, for its first attempt
    (:mod:`app.usecases.first_attempt`): sent from a tasks worker's thread,
    it obeys the same bounds. Refused, it gives its claim back and goes the
    ordinary way (:func:`deliver`): parked, for the ``webhooks`` queue or the
    sender that frees a slot to send when its turn comes.
    """
    admission = _admit(wb, plan.delivery_id, plan.organization_id, plan.url, enlist=False)
    if admission.send:
        return _send_admitted(wb, plan, admission, hand_offs)
    with UnitOfWork(wb.db) as uow:
        deliveries.defer_attempt(uow.session, plan.delivery_id, claimed=True)
    return deliver(wb, plan.delivery_id, hand_offs=hand_offs)


def _send_admitted(wb: Waybill, plan: deliveries.AttemptPlan, admission: Admission, hand_offs: int) -> str:
    result: deliveries.AttemptOutcome | None = None
    let_in: list[str] = []
    try:
        result = _send_and_record(wb, plan)
    finally:
        let_in = _settle(wb, plan.delivery_id, plan.organization_id, admission, result)
        if result is None:  # raising: what the freed slots let in goes through the queue
            _publish(wb, let_in)
    _hand_on(wb, let_in, hand_offs)
    return result.outcome


def _hand_on(wb: Waybill, delivery_ids: list[str], hand_offs: int) -> None:
    """Send the first delivery our freed slots let in ourselves (:data:`HAND_OFFS`); publish the rest."""
    if not delivery_ids:
        return
    first, rest = delivery_ids[0], delivery_ids[1:]
    _publish(wb, rest)
    if hand_offs <= 0:
        _publish(wb, [first])
        return
    try:
        deliver(wb, first, hand_offs=hand_offs - 1)
    except Exception:
        # The database away: the queue (and its retries) take it from here.
        log.warning(
            "webhook hand-off failed; published instead",
            exc_info=True,
            extra={"event": "webhook.handoff_failed", "webhook_id": first},
        )
        _publish(wb, [first])


def _publish(wb: Waybill, delivery_ids: list[str]) -> None:
    for delivery_id in delivery_ids:
        wb.dispatch.deliver(delivery_id)


def _send_and_record(wb: Waybill, plan: deliveries.AttemptPlan) -> deliveries.AttemptOutcome:
    s = wb.settings
    try:
        result = deliveries.send_attempt(
            plan, timeout=s.webhook_timeout_seconds, allow_private=s.webhook_allow_private
        )
        with UnitOfWork(wb.db) as uow:
            countdown = deliveries.record_attempt(
                uow.session, plan, result, retry_base_seconds=s.webhook_retry_base_seconds
            )
            if countdown is not None:
                uow.after_commit(wb.dispatch.deliver, plan.delivery_id, countdown)
    except Exception as exc:
        if is_transient(exc):
            raise
        _failed(wb, plan.delivery_id, exc)
        return deliveries.AttemptOutcome("error", None, 0, type(exc).__name__)
    metrics.WEBHOOK_ATTEMPTS.labels(result.outcome).inc()
    if result.outcome == DeliveryStatus.DELIVERED:
        metrics.WEBHOOK_DELIVERY_SECONDS.observe((utcnow() - plan.created_at).total_seconds())
    log.info(
        "webhook attempt",
        extra={
            "event": "webhook.attempt",
            "webhook_id": plan.delivery_id,
            "task_id": plan.task_id,
            "request_id": plan.request_id,
            "attempt": plan.attempt,
            "outcome": result.outcome,
            "http_status": result.response_status,
            "duration_ms": result.duration_ms,
        },
    )
    return result


def _admit(wb: Waybill, delivery_id: str, org_id: str, url: str, *, enlist: bool) -> Admission:
    """The circuit first (a host that is down takes no slot), then the two slots.

    ``enlist``: one told to wait is held in Redis (parked, or in its host's
    waiting set); only a caller holding no claim on the delivery may ask it.
    """
    host = host_of(url)
    token = ""
    probe = False
    try:
        circuits, slots = _isolation(wb)
        if circuits.enabled and host:
            token = uuid.uuid4().hex
            verdict = circuits.gate(host, delivery_id, token, enlist=enlist)
            if verdict.action == "wait":
                return Admission(False, "circuit_open", verdict.until_ms, host)
            probe = verdict.action == "probe"
        member = f"{delivery_id}:{uuid.uuid4().hex[:12]}"
        refused = slots.acquire(org_id, host, delivery_id, member, park=enlist)
        if refused != "ok":
            if probe:
                circuits.abandon_probe(host, token)  # another attempt may probe at once
            return Admission(False, f"{refused}_limit", 0, host)
    except _REDIS_AWAY as exc:
        # Isolation needs Redis; without it attempts go out as they always did.
        log.warning(
            "delivery isolation unavailable; sending unbounded",
            extra={
                "event": "webhook.isolation_unavailable",
                "webhook_id": delivery_id,
                "error": type(exc).__name__,
            },
        )
        return Admission(True, host=host)
    return Admission(True, host=host, member=member, probe=probe, token=token)


def _deferred(
    wb: Waybill, delivery_id: str, org_id: str, task_id: str, admission: Admission, *, claimed: bool
) -> str:
    """A due attempt not sent, not counted; Redis holds the delivery (parked, or by its circuit).

    A circuit's wait is written to SQL too (``next_attempt_at`` = the next
    probe), so that the sweep does not publish the delivery again meanwhile.
    """
    until = datetime.fromtimestamp(admission.until_ms / 1000, tz=UTC) if admission.until_ms else None
    if until is not None or claimed:
        with UnitOfWork(wb.db) as uow:
            deliveries.defer_attempt(uow.session, delivery_id, until=until, claimed=claimed)
    metrics.WEBHOOK_DEFERRED.labels(admission.reason).inc()
    log.info(
        "webhook attempt deferred",
        extra={
            "event": "webhook.deferred",
            "webhook_id": delivery_id,
            "task_id": task_id,
            "organization_id": org_id,
            "status": admission.reason,
        },
    )
    return "deferred"


def _settle(
    wb: Waybill,
    delivery_id: str,
    org_id: str,
    admission: Admission,
    result: deliveries.AttemptOutcome | None,
) -> list[str]:
    """After an attempt (``result``; None: none was sent): count it against its host, free its slots.

    Returns the parked deliveries the freed slots let in (their slots
    reserved); those a closing circuit hands back are published here.
    """
    if not admission.member:
        return []  # sent without Redis: nothing held, nothing to count
    to_publish: list[str] = []
    let_in: list[str] = []
    try:
        circuits, slots = _isolation(wb)
        if circuits.enabled and admission.host and result is None and admission.probe:
            # Nothing was learnt about the host: let another attempt probe it.
            circuits.abandon_probe(admission.host, admission.token)
        elif circuits.enabled and admission.host and result is not None:
            change = circuits.record(
                admission.host,
                result.outcome,
                result.response_status,
                probe=admission.probe,
                token=admission.token,
            )
            if change == "opened":
                log.warning(
                    "webhook circuit opened",
                    extra={
                        "event": "webhook.circuit_opened",
                        "status": admission.host,
                        "webhook_id": delivery_id,
                    },
                )
            elif change == "closed":
                log.info(
                    "webhook circuit closed",
                    extra={"event": "webhook.circuit_closed", "status": admission.host},
                )
                to_publish.extend(_released_by_circuit(wb, circuits, admission.host))
        let_in = slots.release(org_id, admission.host, admission.member)
    except _REDIS_AWAY as exc:
        # The slots expire with their lease; the sweep hands on what waits.
        log.warning(
            "delivery slots not released",
            extra={"event": "webhook.isolation_unavailable", "error": type(exc).__name__},
        )
    _publish(wb, to_publish)
    return let_in


def _released_by_circuit(wb: Waybill, circuits: Circuits, host: str) -> list[str]:
    """The deliveries that waited for ``host``, made due now (bounded: the sweep takes the rest)."""
    ids = circuits.release(host)
    if ids:
        with UnitOfWork(wb.db) as uow:
            deliveries.bring_forward(uow.session, ids)
    return ids


def _drop_reservation(wb: Waybill, route: deliveries.Route, delivery_id: str) -> None:
    """A message with nothing to send may have been let in with slots reserved: free them."""
    try:
        _circuits, slots = _isolation(wb)
        released = slots.drop_reservation(route.organization_id, host_of(route.url), delivery_id)
    except _REDIS_AWAY:
        return  # a reservation also ends with its lease
    _publish(wb, released)


def hand_on_held(wb: Waybill) -> dict[str, int]:
    """Beat's part (from the sweep): what slots freed by expiry and circuits due let through.

    A slot whose sender died frees itself at its expiry with nobody to run
    the release step; a circuit whose deliveries all wait has nobody to
    probe it. Published here; Redis away: nothing to do (the sweep's SQL
    pass publishes every overdue delivery, held or not).
    """
    try:
        circuits, slots = _isolation(wb)
        drained = slots.release(max_out=100)
        due = circuits.due() if circuits.enabled else []
    except _REDIS_AWAY:
        return {"drained": 0, "circuit": 0}
    if due:
        with UnitOfWork(wb.db) as uow:
            deliveries.bring_forward(uow.session, due)
    for delivery_id in [*drained, *due]:
        wb.dispatch.deliver(delivery_id)
    return {"drained": len(drained), "circuit": len(due)}


def unheld(wb: Waybill, delivery_ids: list[str]) -> list[str]:
    """The overdue deliveries Redis does not hold (parked, or waiting for a circuit): to publish."""
    if not delivery_ids:
        return delivery_ids
    try:
        _circuits, slots = _isolation(wb)
        held = slots.held(delivery_ids)
    except _REDIS_AWAY:
        return delivery_ids  # Redis away: it holds nothing we could count on
    return [d for d in delivery_ids if d not in held]


def _failed(wb: Waybill, delivery_id: str, exc: Exception) -> str:
    """An attempt that raised (claim, payload, record): a failed attempt on the usual schedule."""
    log.exception("webhook attempt raised", extra={"event": "webhook.error", "webhook_id": delivery_id})
    with UnitOfWork(wb.db) as uow:
        countdown = deliveries.record_error(
            uow.session,
            delivery_id,
            f"internal_error: {type(exc).__name__}: {exc}",
            retry_base_seconds=wb.settings.webhook_retry_base_seconds,
        )
        if countdown is not None:
            uow.after_commit(wb.dispatch.deliver, delivery_id, countdown)
    metrics.WEBHOOK_ATTEMPTS.labels("error").inc()
    return "error"
