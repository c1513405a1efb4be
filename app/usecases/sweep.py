"""The periodic sweep that makes "nothing accepted is lost" true, and beat's other jobs.

Beat runs it every ``SWEEP_INTERVAL_SECONDS``. From SQL alone it finds what
dispatch or the broker may have dropped and hands it on again
(:mod:`app.services.sweep` has the queries, :mod:`app.usecases.recovery` the
repair); every step is idempotent, so a sweep that runs twice (two beats) or
overlaps another does no harm. It also cancels the tasks whose deadline
(``cancelAfter``) has passed (:mod:`app.usecases.deadlines`).
"""

from __future__ import annotations

import logging
import os

from app.container import Waybill
from app.services import sweep
from app.usecases import deliver
from app.usecases.deadlines import expire_overdue
from app.usecases.recovery import enqueue_from_sql, rebuild, verify_queued
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.worker")

# Confirm new queued tasks against Redis, a batch at a time, until none is
# left or the bound is reached (the next sweep goes on): 20 batches of 500
# every 5 s keeps up with 2,000 submissions a second.
CONFIRM_BATCHES = 20

_eviction_checked: set[int] = set()  # processes that have looked at Redis's eviction policy


def run_sweep(wb: Waybill) -> dict[str, int]:
    s = wb.settings
    if os.getpid() not in _eviction_checked:
        _eviction_checked.add(os.getpid())
        warning = wb.dispatcher.eviction_warning()
        if warning is not None:
            log.warning(warning, extra={"event": "redis.eviction_policy"})
    if not wb.dispatcher.has_epoch():
        # Redis lost the dispatch state (restarted empty): rebuild it from SQL.
        rebuilt = rebuild(wb.db, wb.dispatcher)
        log.warning(
            "dispatch state rebuilt from SQL", extra={"event": "dispatch.rebuilt", "status": str(rebuilt)}
        )
    # Deadlines first: a task past its cancelAfter is canceled, not handed on again below.
    expired = expire_overdue(wb)
    # Running tasks whose lease expired, and overdue webhook attempts.
    with UnitOfWork(wb.db) as uow:
        found = sweep.plan(uow.session, grace_seconds=s.sweep_grace_seconds)
        # Those Redis holds (parked for a slot, or waiting for their host's
        # circuit) are handed on by it; the rest were lost on the way.
        for delivery_id in deliver.unheld(wb, found.delivery_ids):
            uow.after_commit(wb.dispatch.deliver, delivery_id)
    held = deliver.hand_on_held(wb)
    confirmed = missing = 0
    for _ in range(CONFIRM_BATCHES):
        with wb.db.read_session() as session:
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
    wb.dispatch.step()
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
        "deadlines": expired,
        "webhooks_drained": held["drained"],
        "webhooks_circuit": held["circuit"],
    }


def reconcile(wb: Waybill) -> int:
    """Set drifted organization counters to the truth in SQL; returns how many were corrected."""
    with UnitOfWork(wb.db) as uow:
        fixed = sweep.reconcile_counters(uow.session)
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
