"""Deliver webhook events again now, with the same webhook ids: a task's, or an organization's failed ones."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from app.container import Waybill
from app.services import bulk_redelivery, deliveries, queries
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.api")


def redeliver(wb: Waybill, organization_id: str, task_id: str) -> list[dict[str, Any]]:
    """The task's deliveries, as they are once the redelivery is scheduled; 409 when it has none."""
    with UnitOfWork(wb.db) as uow:
        task = queries.get_task(uow.session, organization_id, task_id)
        for delivery_id in deliveries.redeliver(uow.session, task):
            uow.after_commit(wb.dispatch.deliver, delivery_id)
        # Read in the same transaction: what this redelivery wrote, whatever
        # a worker does after the commit.
        return deliveries.list_for_task(uow.session, task_id)


def redeliver_failed(wb: Waybill, organization_id: str, since: datetime, host: str | None = None) -> int:
    """Deliver again every ``failed`` delivery of the organization created since ``since`` (to ``host``).

    Returns how many were queued (at most ``bulk_redelivery.MAX_PER_CALL``
    per call; the rest stay ``failed`` for the next call). Each batch is its
    own transaction, and its messages are published after its commit.
    """
    with wb.db.read_session() as session:
        batches = list(bulk_redelivery.failed_batches(session, organization_id, since, host))
    count = 0
    for ids in batches:
        with UnitOfWork(wb.db) as uow:
            moved = bulk_redelivery.redeliver_ids(uow.session, ids)
            for delivery_id in moved:
                uow.after_commit(wb.dispatch.deliver, delivery_id)
        count += len(moved)
    log.info(
        "failed deliveries redelivered",
        extra={
            "event": "webhook.bulk_redelivery",
            "organization_id": organization_id,
            "status": f"count={count} since={since.isoformat()} host={host or '*'}",
        },
    )
    return count
