"""Delete expired tasks in small batches, each its own short transaction."""

from __future__ import annotations

import logging

from app.container import Waybill
from app.services import retention
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.worker")


def run_retention(wb: Waybill, max_batches: int = 200) -> int:
    deleted = 0
    for _ in range(max_batches):
        with UnitOfWork(wb.db) as uow:
            n = retention.delete_expired(uow.session)
        deleted += n
        if n == 0:
            break
    if deleted:
        log.info("expired tasks deleted", extra={"event": "retention.deleted", "status": str(deleted)})
    return deleted
