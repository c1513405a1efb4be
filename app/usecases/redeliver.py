"""Deliver a task's webhook events again now, with the same webhook ids."""

from __future__ import annotations

from typing import Any

from app.container import Waybill
from app.services import deliveries, queries
from app.usecases.unit_of_work import UnitOfWork


def redeliver(wb: Waybill, organization_id: str, task_id: str) -> list[dict[str, Any]]:
    """The task's deliveries, as they are once the redelivery is scheduled; 409 when it has none."""
    with UnitOfWork(wb.db) as uow:
        task = queries.get_task(uow.session, organization_id, task_id)
        for delivery_id in deliveries.redeliver(uow.session, task):
            uow.after_commit(wb.dispatch.deliver, delivery_id)
        # Read in the same transaction: what this redelivery wrote, whatever
        # a worker does after the commit.
        return deliveries.list_for_task(uow.session, task_id)
