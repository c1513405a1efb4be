"""Submit a task: check it, store it with its credits and queue place, then hand it to dispatch."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any

import redis

from app.container import Waybill
from app.metrics import SUBMISSIONS
from app.services import outbound, submission
from app.services.errors import QueueFull, ValidationFailed
from app.services.representation import represent
from app.services.submission import SubmitRequest
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.api")


def submit(
    wb: Waybill, organization_id: str, req: SubmitRequest, *, request_id: str | None
) -> tuple[dict[str, Any], bool]:
    """The task's representation, and whether it was created (False: an idempotent replay)."""
    if req.webhook_url is not None:
        try:
            outbound.check_url(req.webhook_url, allow_private=wb.settings.webhook_allow_private)
        except outbound.UnsafeTarget as exc:
            detail = f"The webhook URL is refused: {exc}."
            raise ValidationFailed({"webhook.url": [str(exc)]}, detail) from None
    try:
        with UnitOfWork(wb.db) as uow:
            submitted = submission.submit(
                uow.session, organization_id, req, registry=wb.registry, request_id=request_id
            )
            representation = represent(submitted.task)
            task_id = submitted.task.id
            if submitted.created:
                if wb.settings.fault_crash_after_commit:
                    uow.after_commit(_maybe_crash, wb.settings.fault_crash_after_commit)
                uow.after_commit(wb.dispatch.enqueue, task_id, organization_id, submitted.concurrency_limit)
    except QueueFull as exc:
        with contextlib.suppress(redis.RedisError, RuntimeError):  # Redis away: the default estimate
            exc.set_retry_after(submission.retry_after(wb.dispatcher.drain_rate(organization_id)))
        raise
    outcome = "accepted" if submitted.created else "replayed"
    SUBMISSIONS.labels(outcome).inc()
    log.info(
        "task accepted" if submitted.created else "idempotent replay",
        extra={
            "event": f"task.{outcome}",
            "task_id": task_id,
            "organization_id": organization_id,
            "type": req.type,
        },
    )
    return representation, submitted.created


def _maybe_crash(probability: float) -> None:
    """The chaos suite's fault (FAULT_INJECTION=1 only): die between the commit and dispatch."""
    if random.random() < probability:
        os._exit(70)
