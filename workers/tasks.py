"""Named Celery tasks: each takes an id (or nothing) and calls one use case."""

from __future__ import annotations

from celery import shared_task
from sqlalchemy.exc import OperationalError

from app import queues
from app.container import current
from app.usecases import deliver, retention, run, sweep

# Maintenance tasks (beat's sweep, dispatch step, retention, reconcile) send
# no task events (send_events=False; Celery's worker checks it before every
# task-received/started/succeeded event): the dispatch step alone runs every
# second and would fill Flower's task list, hiding the organizations' tasks.
# They still log, count in /metrics and show in `celery inspect`.

# A database that is briefly away (restart, failover) must not drop the
# message: retry with backoff until it is back; the work is idempotent.
_DB_RETRY: dict[str, object] = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": None,
}


@shared_task(name=queues.RUN_TASK, **_DB_RETRY)
def run_task(task_id: str) -> str:
    wb = current()
    outcome = run.execute(
        wb.db,
        wb.registry,
        run.settings_of(wb.settings),
        task_id,
        wb.dispatch,
        wb.first_attempts,
        wb.progress,
    )
    return outcome.status or "skipped"


@shared_task(name=queues.DELIVER_WEBHOOK, **_DB_RETRY)
def deliver_webhook(delivery_id: str) -> str:
    return deliver.deliver(current(), delivery_id)


@shared_task(name=queues.SWEEP, send_events=False)
def sweep_task() -> dict[str, int]:
    return sweep.run_sweep(current())


@shared_task(name=queues.DISPATCH_STEP, send_events=False)
def dispatch_step() -> int:
    """Beat's dispatch step: nothing waits for a trigger that was lost."""
    return current().dispatch.step()


@shared_task(name=queues.RETENTION, send_events=False)
def retention_task(max_batches: int = 200) -> int:
    return retention.run_retention(current(), max_batches)


@shared_task(name=queues.RECONCILE, send_events=False)
def reconcile_task() -> int:
    return sweep.reconcile(current())
