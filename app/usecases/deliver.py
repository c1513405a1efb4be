"""Deliver one webhook attempt: claim it, send it with no transaction open, record it.

Any exception of an attempt -- in the exchange (``send_attempt`` turns those
into outcomes), or in claiming or recording it -- ends as a recorded failed
attempt on the usual retry schedule: a delivery never stays pending with no
attempt for the sweep to try again forever. Only a database that is away
propagates, for the Celery task to retry.
"""

from __future__ import annotations

import logging

from app import metrics
from app.container import Waybill
from app.db import is_transient
from app.models import DeliveryStatus
from app.models.base import utcnow
from app.services import deliveries
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.worker")


def deliver(wb: Waybill, delivery_id: str) -> str:
    """The attempt's outcome (``delivered``, ``http_error``, ``error``...), or ``skipped``."""
    try:
        with UnitOfWork(wb.db) as uow:
            plan = deliveries.claim_attempt(
                uow.session,
                delivery_id,
                hold_seconds=deliveries.hold_seconds(wb.settings.webhook_timeout_seconds),
            )
    except Exception as exc:
        if is_transient(exc):
            raise
        return _failed(wb, delivery_id, exc)
    if plan is None:
        return "skipped"  # not due, or another worker holds it, or it ended
    return send_claimed(wb, plan)


def send_claimed(wb: Waybill, plan: deliveries.AttemptPlan) -> str:
    """Send an attempt already claimed and record it.

    Claimed by :func:`deliver`, or, for a result's first attempt, in the
    transaction that recorded the result (:mod:`app.usecases.first_attempt`).
    """
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
        return _failed(wb, plan.delivery_id, exc)
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
    return result.outcome


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
