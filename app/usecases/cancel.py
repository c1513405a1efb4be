"""Cancel a waiting or running task: refunded, its slot freed, its run stopped, its event sent."""

from __future__ import annotations

import logging
from typing import Any

from app.container import Waybill
from app.metrics import TASKS_FINISHED
from app.models import TaskStatus
from app.services import lifecycle
from app.services.representation import represent
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.api")


def cancel(wb: Waybill, organization_id: str, task_id: str) -> dict[str, Any]:
    """The canceled task's representation; 404 for another organization's task, 409 once final."""
    with UnitOfWork(wb.db) as uow:
        task, ended = lifecycle.cancel(
            uow.session, organization_id, task_id, retention_days=wb.settings.result_retention_days
        )
        representation = represent(task)
        after_cancel(uow, wb, task_id, ended)
        uow.after_commit(wb.dispatch.step)  # the slot it held can serve another task
    TASKS_FINISHED.labels(task.type, TaskStatus.CANCELED.value).inc()
    log.info(
        "task canceled",
        extra={"event": "task.canceled", "task_id": task_id, "organization_id": organization_id},
    )
    return representation


def after_cancel(uow: UnitOfWork, wb: Waybill, task_id: str, ended: lifecycle.Ended) -> None:
    """The effects of a cancel once committed (a client's, or a deadline's: app.usecases.deadlines)."""
    # Out of its waiting list, or its slot freed (a lost call ends with its lease).
    uow.after_commit(wb.dispatch.release, task_id, ended.organization_id)
    if ended.was == TaskStatus.RUNNING:
        uow.after_commit(wb.dispatch.revoke, task_id)  # its outcome is discarded anyway
    uow.after_commit(wb.dispatch.deliver, ended.delivery_id)
    uow.after_commit(wb.dispatch.notify, task_id, TaskStatus.CANCELED.value)
