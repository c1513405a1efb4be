"""Running one task: claim it, run its handler under a renewed lease, record the outcome once."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis

from app import metrics
from app.db import Database, is_transient
from app.models.base import utcnow
from app.services import json_limits, tasks
from app.services.dispatch import Dispatcher
from app.services.task_types import Registry, TaskContext, TaskError

log = logging.getLogger("waybill.runner")

MAX_RESULT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RunSettings:
    lease_seconds: float
    max_attempts: int
    allow_private_targets: bool
    retention_days: float = 30.0


@dataclass(frozen=True)
class RunOutcome:
    ran: bool
    recorded: bool
    delivery_id: str | None = None
    status: str | None = None
    # False only when another live run holds the task: its slot is not ours to free.
    release: bool = True


@dataclass
class _Run:
    db: Database
    dispatcher: Dispatcher | None
    task_id: str
    attempt: int
    lease: float
    due: float  # monotonic time of its next renewal
    switched: bool = False  # its dispatch lease moved from the release lease to the run's


class _Leases:
    """Renews the leases of this process's runs in progress, from one thread.

    A run's dispatch lease in Redis goes at once from the release lease (how
    long a released task may wait for a worker) to the run's own; then both
    leases, SQL's and Redis's, are renewed every third of their length. One
    long-lived thread per process does it, so a run costs no thread start and
    no Redis round trip on its own path; a run that ends before the thread
    gets to it (most short tasks) needs nothing renewed.
    """

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0

    def _ensure_thread(self) -> None:
        # Per process: a Celery prefork child does not inherit its parent's threads.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            threading.Thread(target=self._loop, name="lease-renewal", daemon=True).start()

    @contextmanager
    def hold(
        self, db: Database, dispatcher: Dispatcher | None, task_id: str, attempt: int, lease: float
    ) -> Iterator[None]:
        run = _Run(db, dispatcher, task_id, attempt, lease, due=time.monotonic())
        with self._lock:
            self._ensure_thread()
            self._runs[task_id] = run
        self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                if self._runs.get(task_id) is run:
                    del self._runs[task_id]

    def _loop(self) -> None:
        while True:
            with self._lock:
                runs = list(self._runs.values())
            now = time.monotonic()
            for run in runs:
                if run.due <= now:
                    self._renew(run)
            with self._lock:
                dues = [r.due for r in self._runs.values()]
            self._wake.wait(timeout=max(0.0, min(dues) - time.monotonic()) if dues else None)
            self._wake.clear()

    def _renew(self, run: _Run) -> None:
        with self._lock:
            if self._runs.get(run.task_id) is not run:
                return  # finished meanwhile
        run.due = time.monotonic() + run.lease / 3
        try:
            if run.switched:
                with run.db.session() as session:
                    until = utcnow() + timedelta(seconds=run.lease)
                    if not tasks.renew_lease(session, run.task_id, run.attempt, until):
                        with self._lock:  # canceled or taken over: nothing left to renew
                            self._runs.pop(run.task_id, None)
                        return
            run.switched = True  # the claim set the SQL lease; only Redis's needs switching
            if run.dispatcher is not None:
                _quietly(run.dispatcher.renew, run.task_id, run.lease)
        except Exception:  # a database blip: try again at the next beat
            log.warning("lease renewal failed", extra={"task_id": run.task_id})


_leases = _Leases()


def execute(
    db: Database,
    registry: Registry,
    settings: RunSettings,
    task_id: str,
    dispatcher: Dispatcher | None = None,
) -> RunOutcome:
    """Run the task once if it is ours to run; the caller frees its slot when ``release``.

    Whatever raises on the way -- claiming, decoding the input, the handler,
    checking or recording the result -- ends the task as a recorded failure
    (``failed`` with a code, credits refunded, the slot freed): never an
    exception that leaves it claimed or queued for the lease to bring back.
    Only a database that is away (:func:`app.db.is_transient`) propagates:
    the Celery task retries the message until it is back.
    """
    try:
        with db.session() as session:
            claim = tasks.claim(
                session,
                task_id,
                lease_seconds=settings.lease_seconds,
                max_attempts=settings.max_attempts,
                retention_days=settings.retention_days,
            )
    except Exception as exc:
        if is_transient(exc):
            raise
        return _fail(db, settings, task_id, "claim_failed", "Waybill could not start this task", exc)
    task = claim.task
    if task is None:
        if claim.reason == "busy" and dispatcher is not None and claim.lease_expires_at is not None:
            # A duplicate release of a task another run holds: let its
            # dispatch lease end with that run's lease, so a dead run's
            # task comes back as soon as its SQL lease says so.
            left = (claim.lease_expires_at - utcnow()).total_seconds()
            _quietly(dispatcher.renew, task_id, max(1.0, left + 1.0))
        if claim.reason == "lost":
            metrics.TASKS_FINISHED.labels(claim.type, "failed").inc()
        return RunOutcome(
            ran=False,
            recorded=claim.reason == "lost",
            delivery_id=claim.delivery_id,
            status="failed" if claim.reason == "lost" else None,
            release=claim.reason != "busy",
        )
    attempt = claim.attempt
    created_at = task.created_at
    type_name = task.type
    request_id = task.request_id
    task_type = registry.get(task.type)
    context = TaskContext(
        task_id=task.id,
        organization_id=task.organization_id,
        attempt=attempt,
        allow_private_targets=settings.allow_private_targets,
    )
    log.info(
        "task started",
        extra={
            "event": "task.started",
            "task_id": task_id,
            "attempt": attempt,
            "type": type_name,
            "request_id": request_id,
        },
    )
    result: Any = None
    error: tuple[str, str] | None = None
    run_started = time.monotonic()
    with _leases.hold(db, dispatcher, task_id, attempt, settings.lease_seconds):
        try:
            task_input = tasks.decode_input(claim.input_json)
        except (ValueError, RecursionError) as exc:
            error = ("input_unreadable", f"The stored input cannot be decoded: {type(exc).__name__}")
        else:
            if task_type is None:
                error = ("unknown_type", f"No handler is installed for task type {type_name!r}.")
            else:
                try:
                    result = task_type.handler(task_input, context)
                except TaskError as exc:
                    error = (exc.code, exc.message)
                except Exception as exc:
                    error = ("handler_error", f"{type(exc).__name__}: {exc}"[:1000])
                else:
                    error = _check_result(result)
                    if error is not None:
                        result = None
    try:
        with db.session() as session:
            recorded, delivery_id = tasks.record_result(
                session,
                task_id,
                attempt,
                result=result,
                error=error,
                retention_days=settings.retention_days,
            )
    except Exception as exc:
        if is_transient(exc):
            raise
        return _fail(db, settings, task_id, "result_not_storable", "The outcome could not be recorded", exc)
    status = "failed" if error else "succeeded"
    metrics.TASK_RUN_SECONDS.labels(type_name).observe(time.monotonic() - run_started)
    if recorded:
        metrics.TASKS_FINISHED.labels(type_name, status).inc()
        metrics.TASK_LATENCY_SECONDS.labels(type_name).observe((utcnow() - created_at).total_seconds())
    log.info(
        "task finished" if recorded else "task outcome discarded",
        extra={
            "event": "task.finished" if recorded else "task.discarded",
            "task_id": task_id,
            "attempt": attempt,
            "status": status,
            "request_id": request_id,
        },
    )
    return RunOutcome(ran=True, recorded=recorded, delivery_id=delivery_id, status=status)


def _fail(
    db: Database, settings: RunSettings, task_id: str, code: str, what: str, exc: Exception
) -> RunOutcome:
    """Record the task as failed after an unexpected error; the caller frees its slot."""
    log.exception(
        "task run raised; recorded as failed",
        extra={"event": "task.run_error", "task_id": task_id, "error": type(exc).__name__},
    )
    message = f"{what}: {type(exc).__name__}: {exc}"[:1000]
    with db.session() as session:
        failed, delivery_id = tasks.fail_task(
            session, task_id, code, message, retention_days=settings.retention_days
        )
    if failed:
        metrics.TASKS_FINISHED.labels("unknown", "failed").inc()
    return RunOutcome(
        ran=False, recorded=failed, delivery_id=delivery_id, status="failed" if failed else None
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


def _quietly(fn: Any, *args: Any) -> None:
    """Redis being briefly away must not fail a run: the lease is renewed again at the next beat."""
    try:
        fn(*args)
    except redis.RedisError as exc:
        log.warning(
            "dispatch lease renewal failed",
            extra={"event": "lease.renew_failed", "error": type(exc).__name__},
        )
