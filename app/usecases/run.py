"""Run one task: claim it, run its handler under a renewed lease, record the outcome once.

Whatever raises on the way -- claiming, decoding the input, the handler,
checking or recording the result -- ends the task as a recorded failure
(``failed`` with a code, credits refunded, the slot freed): never an exception
that leaves it claimed or queued for the lease to bring back. Only a database
that is away (:func:`app.db.is_transient`) propagates: the Celery task retries
the message until it is back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from app import metrics
from app.db import Database, is_transient
from app.dispatch import Dispatch
from app.models import TaskStatus
from app.models.base import utcnow
from app.services import deliveries, json_limits, lifecycle
from app.services.leases import leases
from app.services.lifecycle import ClaimReason
from app.services.task_types import Registry, TaskContext, TaskError
from app.usecases.progress import ProgressWriter
from app.usecases.unit_of_work import UnitOfWork
from config import Settings

log = logging.getLogger("waybill.runner")

MAX_RESULT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RunSettings:
    lease_seconds: float
    max_attempts: int
    allow_private_targets: bool
    retention_days: float = 30.0
    # A first webhook attempt claimed with the result is ours this long (deliveries.hold_seconds).
    webhook_hold_seconds: float = 40.0


def settings_of(settings: Settings) -> RunSettings:
    return RunSettings(
        lease_seconds=settings.task_lease_seconds,
        max_attempts=settings.task_max_attempts,
        allow_private_targets=settings.fetch_allow_private,
        retention_days=settings.result_retention_days,
        webhook_hold_seconds=deliveries.hold_seconds(settings.webhook_timeout_seconds),
    )


class FirstAttemptThreads(Protocol):
    """Where a result's first webhook attempt is sent from (``FirstAttempts``)."""

    def reserve(self) -> bool: ...

    def start(self, plan: deliveries.AttemptPlan) -> None: ...

    def release(self) -> None: ...


def _hand_on(
    dispatch: Dispatch,
    threads: FirstAttemptThreads | None,
    delivery_id: str | None,
    plan: deliveries.AttemptPlan | None,
) -> None:
    """The result's webhook: its claimed first attempt to the reserved thread, else the webhooks queue."""
    if plan is not None and threads is not None:
        threads.start(plan)
        return
    if threads is not None:
        threads.release()  # reserved, but no attempt to send
    if delivery_id is not None:
        dispatch.deliver(delivery_id)


@dataclass(frozen=True)
class RunOutcome:
    ran: bool
    recorded: bool
    delivery_id: str | None = None
    status: str | None = None


def execute(
    db: Database,
    registry: Registry,
    settings: RunSettings,
    task_id: str,
    dispatch: Dispatch | None = None,
    first_attempts: FirstAttemptThreads | None = None,
    progress: ProgressWriter | None = None,
) -> RunOutcome:
    """Run the task once if it is ours to run; ``dispatch`` (None in tests) gets the effects.

    ``first_attempts``: with a thread reserved there, the result's first
    webhook attempt is claimed in the record's transaction and sent from
    this process (:mod:`app.usecases.first_attempt`); otherwise it is
    published to the webhooks queue. ``progress``: where the handler's
    progress reports go (:mod:`app.usecases.progress`).
    """
    try:
        with UnitOfWork(db) as uow:
            claim = lifecycle.claim(
                uow.session,
                task_id,
                lease_seconds=settings.lease_seconds,
                max_attempts=settings.max_attempts,
                retention_days=settings.retention_days,
            )
            if dispatch is not None and claim.task is None:
                _after_no_run(uow, dispatch, task_id, claim)
            elif dispatch is not None:
                # task.started's webhook when webhook.events asks for it. The event
                # streams hear of the start from the lease thread's first renewal
                # (app/services/leases.py), or from the final status.
                uow.after_commit(dispatch.deliver, claim.delivery_id)
    except Exception as exc:
        if is_transient(exc):
            raise
        return _fail(
            db, settings, task_id, "claim_failed", "Waybill could not start this task", exc, dispatch
        )
    task = claim.task
    if task is None:
        # The claim may have ended it instead: lost worker (failed) or past its deadline (canceled).
        if claim.ended is not None:
            metrics.TASKS_FINISHED.labels(claim.type, claim.ended).inc()
        return RunOutcome(
            ran=False,
            recorded=claim.ended is not None,
            delivery_id=claim.delivery_id,
            status=claim.ended,
        )
    attempt = claim.attempt
    context = TaskContext(
        task_id=task.id,
        organization_id=task.organization_id,
        attempt=attempt,
        allow_private_targets=settings.allow_private_targets,
        reporter=(
            (lambda fraction, message: progress.report(task_id, attempt, fraction, message))
            if progress is not None
            else None
        ),
    )
    log.info(
        "task started",
        extra={
            "event": "task.started",
            "task_id": task_id,
            "attempt": claim.attempt,
            "type": task.type,
            "request_id": task.request_id,
        },
    )
    run_started = time.monotonic()
    with leases.hold(db, dispatch, task_id, claim.attempt, settings.lease_seconds):
        result, error = _run_handler(registry, task.type, claim.input_json, context)
        if progress is not None:
            _flush_progress(progress, task_id)
    reserved = dispatch is not None and first_attempts is not None and first_attempts.reserve()
    threads = first_attempts if reserved else None
    try:
        with UnitOfWork(db) as uow:
            recorded, delivery_id = lifecycle.record_result(
                uow.session,
                task_id,
                claim.attempt,
                result=result,
                error=error,
                retention_days=settings.retention_days,
            )
            plan = None
            if threads is not None and delivery_id is not None:
                plan = deliveries.claim_attempt(
                    uow.session, delivery_id, hold_seconds=settings.webhook_hold_seconds
                )
            status = TaskStatus.FAILED if error else TaskStatus.SUCCEEDED
            if dispatch is not None:
                uow.after_commit(_hand_on, dispatch, threads, delivery_id, plan)
                uow.after_commit(dispatch.finish, task_id, status if recorded else None)
    except Exception as exc:
        if threads is not None:
            threads.release()  # rolled back: nothing was claimed, nothing to send
        if is_transient(exc):
            raise
        return _fail(
            db, settings, task_id, "result_not_storable", "The outcome could not be recorded", exc, dispatch
        )
    metrics.TASK_RUN_SECONDS.labels(task.type).observe(time.monotonic() - run_started)
    if recorded:
        metrics.TASKS_FINISHED.labels(task.type, status).inc()
        metrics.TASK_LATENCY_SECONDS.labels(task.type).observe((utcnow() - task.created_at).total_seconds())
    log.info(
        "task finished" if recorded else "task outcome discarded",
        extra={
            "event": "task.finished" if recorded else "task.discarded",
            "task_id": task_id,
            "attempt": claim.attempt,
            "status": status,
            "request_id": task.request_id,
        },
    )
    return RunOutcome(ran=True, recorded=recorded, delivery_id=delivery_id, status=status)


def _flush_progress(progress: ProgressWriter, task_id: str) -> None:
    """The handler's last report, stored before its outcome; a failure here never fails the task."""
    try:
        progress.flush(task_id)
    except Exception:
        log.warning("progress not stored", exc_info=True, extra={"event": "task.progress_failed"})


def _after_no_run(uow: UnitOfWork, dispatch: Dispatch, task_id: str, claim: lifecycle.Claim) -> None:
    """The effects of a claim that gave nothing to run."""
    if claim.reason == ClaimReason.BUSY:
        # A duplicate release of a task another run holds: its slot is not
        # ours to free; let its dispatch lease end with that run's lease, so
        # a dead run's task comes back as soon as its SQL lease says so.
        assert claim.lease_expires_at is not None
        left = (claim.lease_expires_at - utcnow()).total_seconds()
        uow.after_commit(dispatch.renew, task_id, max(1.0, left + 1.0))
        uow.after_commit(dispatch.step)
        return
    uow.after_commit(dispatch.deliver, claim.delivery_id)
    uow.after_commit(dispatch.finish, task_id, claim.ended)


def _run_handler(
    registry: Registry, type_name: str, input_json: str | None, context: TaskContext
) -> tuple[Any, tuple[str, str] | None]:
    """(result, None) or (None, (code, message)); never raises."""
    try:
        task_input = lifecycle.decode_input(input_json)
    except (ValueError, RecursionError) as exc:
        return None, ("input_unreadable", f"The stored input cannot be decoded: {type(exc).__name__}")
    task_type = registry.get(type_name)
    if task_type is None:
        return None, ("unknown_type", f"No handler is installed for task type {type_name!r}.")
    try:
        result = task_type.handler(task_input, context)
    except TaskError as exc:
        return None, (exc.code, exc.message)
    except Exception as exc:
        return None, ("handler_error", f"{type(exc).__name__}: {exc}"[:1000])
    error = _check_result(result)
    return (None, error) if error is not None else (result, None)


def _fail(
    db: Database,
    settings: RunSettings,
    task_id: str,
    code: str,
    what: str,
    exc: Exception,
    dispatch: Dispatch | None,
) -> RunOutcome:
    """Record the task as failed after an unexpected error, and free its slot."""
    log.exception(
        "task run raised; recorded as failed",
        extra={"event": "task.run_error", "task_id": task_id, "error": type(exc).__name__},
    )
    message = f"{what}: {type(exc).__name__}: {exc}"[:1000]
    with UnitOfWork(db) as uow:
        ended = lifecycle.fail_task(
            uow.session, task_id, code, message, retention_days=settings.retention_days
        )
        if dispatch is not None:
            uow.after_commit(dispatch.deliver, ended.delivery_id)
            uow.after_commit(dispatch.finish, task_id, TaskStatus.FAILED if ended.done else None)
    if ended.done:
        metrics.TASKS_FINISHED.labels(ended.type, TaskStatus.FAILED).inc()
    return RunOutcome(
        ran=False,
        recorded=ended.done,
        delivery_id=ended.delivery_id,
        status=TaskStatus.FAILED if ended.done else None,
    )


def _check_result(result: Any) -> tuple[str, str] | None:
    found = json_limits.violation(result, max_depth=json_limits.MAX_RESULT_DEPTH, path="result")
    if found is not None:
        where, reason = found
        return ("result_invalid", f"The handler's result cannot be stored: {where} {reason}."[:1000])
    try:
        size = len(json.dumps(result))
    except (TypeError, ValueError) as exc:
        return ("result_not_json", f"The handler's result is not JSON: {exc}"[:1000])
    if size > MAX_RESULT_BYTES:
        return ("result_too_large", "The handler's result is larger than 4 MiB.")
    return None
