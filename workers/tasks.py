"""Named Celery tasks. Each takes an id, calls a service, and publishes what follows."""

from __future__ import annotations

import logging
import os

import redis
from celery import shared_task
from flask import current_app
from sqlalchemy.exc import OperationalError

from app import metrics
from app.db import is_transient
from app.factory import Waybill
from app.models.base import utcnow
from app.services import deliveries, runner, sweep, tasks
from app.services.dispatch import (
    dispatch_delivery,
    dispatch_step,
    enqueue_from_sql,
    publish_released,
    rebuild,
    verify_queued,
)
from app.services.waiting import CHANNEL, notify_final

log = logging.getLogger("waybill.worker")


def _waybill() -> Waybill:
    wb: Waybill = current_app.extensions["waybill"]
    return wb


# A database that is briefly away (restart, failover) must not drop the
# message: retry with backoff until it is back; the work is idempotent.
_DB_RETRY: dict[str, object] = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": None,
}


@shared_task(name="waybill.tasks.run", **_DB_RETRY)
def run_task(task_id: str) -> str:
    wb = _waybill()
    s = wb.settings
    outcome = runner.execute(
        wb.db,
        wb.registry,
        runner.RunSettings(
            lease_seconds=s.task_lease_seconds,
            max_attempts=s.task_max_attempts,
            allow_private_targets=s.fetch_allow_private,
            retention_days=s.result_retention_days,
        ),
        task_id,
        wb.dispatcher,
    )
    dispatch_delivery(wb.publisher, outcome.delivery_id)
    notify = (CHANNEL + task_id, outcome.status or "") if outcome.recorded else None
    if not outcome.release:
        if notify is not None:
            notify_final(wb.redis, task_id, notify[1])
        dispatch_step(wb.dispatcher, wb.publisher)
        return outcome.status or "skipped"
    # Free the slot, wake Prefer: wait requests and refill the slot at once,
    # in one round trip. If Redis is away the lease expires (the claim then
    # finds the task final and lets go) and beat's step refills.
    try:
        released = wb.dispatcher.finish_and_step(task_id, notify=notify)
    except redis.RedisError as exc:
        log.warning("dispatch step failed", extra={"event": "dispatch.failed", "error": type(exc).__name__})
        released = []
    publish_released(wb.publisher, released)
    return outcome.status or "skipped"


@shared_task(name="waybill.webhooks.deliver", **_DB_RETRY)
def deliver_webhook(delivery_id: str) -> str:
    wb = _waybill()
    s = wb.settings
    try:
        with wb.db.session() as session:
            plan = deliveries.claim_attempt(session, delivery_id, hold_seconds=s.webhook_timeout_seconds + 30)
        if plan is None:
            return "skipped"
        # send_attempt turns every error of the exchange into an outcome.
        result = deliveries.send_attempt(
            plan, timeout=s.webhook_timeout_seconds, allow_private=s.webhook_allow_private
        )
        with wb.db.session() as session:
            countdown = deliveries.record_attempt(
                session, plan, result, retry_base_seconds=s.webhook_retry_base_seconds
            )
    except Exception as exc:
        if is_transient(exc):
            raise
        # Claiming or recording raised: a failed attempt all the same.
        log.exception("webhook attempt raised", extra={"event": "webhook.error", "webhook_id": delivery_id})
        with wb.db.session() as session:
            countdown = deliveries.record_error(
                session,
                delivery_id,
                f"internal_error: {type(exc).__name__}: {exc}",
                retry_base_seconds=s.webhook_retry_base_seconds,
            )
        metrics.WEBHOOK_ATTEMPTS.labels("error").inc()
        if countdown is not None:
            dispatch_delivery(wb.publisher, delivery_id, countdown)
        return "error"
    metrics.WEBHOOK_ATTEMPTS.labels(result.outcome).inc()
    if result.outcome == deliveries.DELIVERED:
        metrics.WEBHOOK_DELIVERY_SECONDS.observe((utcnow() - plan.created_at).total_seconds())
    log.info(
        "webhook attempt",
        extra={
            "event": "webhook.attempt",
            "webhook_id": delivery_id,
            "task_id": plan.task_id,
            "request_id": plan.request_id,
            "attempt": plan.attempt,
            "outcome": result.outcome,
            "http_status": result.response_status,
            "duration_ms": result.duration_ms,
        },
    )
    if countdown is not None:
        dispatch_delivery(wb.publisher, delivery_id, countdown)
    return result.outcome


SWEEP_CONFIRM_BATCHES = 20


_eviction_checked: list[int] = []  # pids of processes that have checked


@shared_task(name="waybill.maintenance.sweep")
def sweep_task() -> dict[str, int]:
    wb = _waybill()
    s = wb.settings
    if os.getpid() not in _eviction_checked:
        _eviction_checked.append(os.getpid())
        warning = wb.dispatcher.eviction_warning()
        if warning is not None:
            log.warning(warning, extra={"event": "redis.eviction_policy"})
    if not wb.dispatcher.has_epoch():
        # Redis lost the dispatch state (restarted empty): rebuild it from SQL.
        rebuilt = rebuild(wb.db, wb.dispatcher)
        log.warning(
            "dispatch state rebuilt from SQL", extra={"event": "dispatch.rebuilt", "status": str(rebuilt)}
        )
    with wb.db.session() as session:
        found = sweep.plan(session, grace_seconds=s.sweep_grace_seconds)
    # Confirm new queued tasks against Redis, a batch at a time, until none
    # is left or the bound is reached (the next sweep goes on): 20 batches
    # of 500 every 5 s keeps up with 2,000 submissions a second.
    confirmed = missing = 0
    for _ in range(SWEEP_CONFIRM_BATCHES):
        with wb.db.session() as session:
            batch = sweep.unconfirmed(session, grace_seconds=s.sweep_grace_seconds)
        missing += enqueue_from_sql(wb.db, wb.dispatcher, batch)
        confirmed += len(batch)
        if len(batch) < sweep.BATCH:
            break
    # Every queued task, whatever the flag above says, in bounded batches:
    # a Redis rolled back to an older snapshot is repaired within a minute.
    verified, restored = verify_queued(wb.db, wb.dispatcher, grace_seconds=s.sweep_grace_seconds)
    if restored:
        log.warning(
            "queued tasks missing from dispatch restored",
            extra={"event": "dispatch.restored", "status": f"restored={restored} checked={verified}"},
        )
    orphaned = enqueue_from_sql(wb.db, wb.dispatcher, found.orphaned_ids, drop_leases=True)
    dispatch_step(wb.dispatcher, wb.publisher)
    for delivery_id in found.delivery_ids:
        dispatch_delivery(wb.publisher, delivery_id)
    if missing or found.orphaned_ids or found.delivery_ids:
        log.info(
            "sweep republished",
            extra={
                "event": "sweep.republished",
                "status": (
                    f"tasks={missing} orphaned={len(found.orphaned_ids)} webhooks={len(found.delivery_ids)}"
                ),
            },
        )
    return {
        "confirmed": confirmed,
        "verified": verified,
        "restored": restored,
        "tasks": missing,
        "orphaned": len(found.orphaned_ids),
        "orphans_requeued": orphaned,
        "webhooks": len(found.delivery_ids),
    }


@shared_task(name="waybill.maintenance.dispatch")
def dispatch_task_() -> int:
    """Beat's dispatch step: nothing waits for a trigger that was lost."""
    wb = _waybill()
    return dispatch_step(wb.dispatcher, wb.publisher)


@shared_task(name="waybill.maintenance.retention")
def retention_task(max_batches: int = 200) -> int:
    """Delete expired tasks in small batches, each its own short transaction."""
    wb = _waybill()
    deleted = 0
    for _ in range(max_batches):
        with wb.db.session() as session:
            n = tasks.delete_expired(session)
        deleted += n
        if n == 0:
            break
    if deleted:
        log.info("expired tasks deleted", extra={"event": "retention.deleted", "status": str(deleted)})
    return deleted


@shared_task(name="waybill.maintenance.reconcile")
def reconcile_task() -> int:
    wb = _waybill()
    with wb.db.session() as session:
        fixed = sweep.reconcile_counters(session)
    for org_id, (queued, running) in fixed.items():
        log.warning(
            "counters corrected",
            extra={
                "event": "counters.corrected",
                "organization_id": org_id,
                "status": f"queued={queued} running={running}",
            },
        )
    return len(fixed)
