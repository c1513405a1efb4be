"""Submit tasks: check them, store them with their credits and queue places, then hand them to dispatch."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis

from app.container import Waybill
from app.metrics import LIMIT_REJECTIONS, SUBMISSIONS
from app.services import outbound, submission
from app.services.errors import QueueFull, ServiceError, ValidationFailed
from app.services.representation import represent
from app.services.submission import SubmitRequest, Submitted
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.api")


def submit(
    wb: Waybill, organization_id: str, req: SubmitRequest, *, request_id: str | None
) -> tuple[dict[str, Any], bool]:
    """The task's representation, and whether it was created (False: an idempotent replay)."""
    if req.webhook_url is not None:
        _check_webhook(wb, req.webhook_url)
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
        exc.set_retry_after(_retry_after(wb, organization_id))
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


def submit_many(
    wb: Waybill,
    organization_id: str,
    items: Sequence[SubmitRequest | ServiceError],
    *,
    request_id: str | None,
) -> list[tuple[dict[str, Any], bool] | ServiceError]:
    """Per item, in order: (representation, created) or its error; the accepted ones in one transaction.

    ``items`` holds the parsed submissions, or the error an item already got
    while it was parsed. Each item is judged as :func:`submit` would judge it
    alone, after the items before it; the accepted tasks are committed
    together, then handed to dispatch in one Redis round trip. What needs no
    database (webhook URLs, task types and inputs) is checked before the
    transaction, and the tasks are represented after it.
    """
    refused_urls: dict[str, ValidationFailed | None] = {}  # one DNS look-up per URL and batch
    checked: list[submission.Prepared | ServiceError] = []
    for item in items:
        if isinstance(item, ServiceError):
            checked.append(item)
            continue
        try:
            if item.webhook_url is not None:
                if item.webhook_url not in refused_urls:
                    refused_urls[item.webhook_url] = _webhook_refusal(wb, item.webhook_url)
                refused = refused_urls[item.webhook_url]
                if refused is not None:
                    raise refused
            checked.append(submission.prepare(item, wb.registry))
        except ValidationFailed as exc:
            checked.append(exc)
    with UnitOfWork(wb.db) as uow:
        results, concurrency_limit = submission.submit_many(
            uow.session, organization_id, checked, request_id=request_id
        )
        created = [r.task.id for r in results if isinstance(r, Submitted) and r.created]
        if created:
            if wb.settings.fault_crash_after_commit:
                uow.after_commit(_maybe_crash, wb.settings.fault_crash_after_commit)
            uow.after_commit(wb.dispatch.enqueue_many, created, organization_id, concurrency_limit)
    full = [r for r in results if isinstance(r, QueueFull)]
    if full:
        seconds = _retry_after(wb, organization_id)
        for refusal in full:
            refusal.set_retry_after(seconds)
    outcomes = Counter(_outcome(r) for r in results)
    for outcome, n in outcomes.items():
        SUBMISSIONS.labels(outcome).inc(n)
    for outcome, limit in (("rejected_402", "credits"), ("rejected_429", "queue")):
        if outcomes[outcome]:
            LIMIT_REJECTIONS.labels(organization_id, limit).inc(outcomes[outcome])
    log.info(
        "batch submitted",
        extra={
            "event": "task.batch",
            "organization_id": organization_id,
            "status": " ".join(f"{k}={v}" for k, v in sorted(outcomes.items())),
        },
    )
    return [(represent(r.task), r.created) if isinstance(r, Submitted) else r for r in results]


def _outcome(result: Submitted | ServiceError) -> str:
    """The ``waybill_submissions_total`` label of one item, as for a single submission."""
    if isinstance(result, Submitted):
        return "accepted" if result.created else "replayed"
    return {402: "rejected_402", 429: "rejected_429"}.get(result.status, "rejected_4xx")


def _check_webhook(wb: Waybill, url: str) -> None:
    """400 unless the webhook URL is one Waybill may POST to."""
    refused = _webhook_refusal(wb, url)
    if refused is not None:
        raise refused


def _webhook_refusal(wb: Waybill, url: str) -> ValidationFailed | None:
    try:
        outbound.check_url(url, allow_private=wb.settings.webhook_allow_private)
    except outbound.UnsafeTarget as exc:
        return ValidationFailed({"webhook.url": [str(exc)]}, f"The webhook URL is refused: {exc}.")
    return None


def _retry_after(wb: Waybill, organization_id: str) -> int:
    """Seconds a refused submission should wait for a queue place; the default when Redis is away."""
    with contextlib.suppress(redis.RedisError, RuntimeError):
        return submission.retry_after(wb.dispatcher.drain_rate(organization_id))
    return submission.retry_after(0.0)


def _maybe_crash(probability: float) -> None:
    """The chaos suite's fault (FAULT_INJECTION=1 only): die between the commit and dispatch."""
    if random.random() < probability:
        os._exit(70)
