"""``/v1/tasks``: submit, poll, list, cancel, and the webhook delivery log."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any

import redis
from flask import Blueprint, Response, g, jsonify, request
from marshmallow import ValidationError

from app.api.requests import json_body, organization_id, read_session, session, waybill
from app.api.schemas import ListTasksQuery, SubmitTaskSchema
from app.metrics import SUBMISSIONS, TASKS_FINISHED
from app.models import TaskStatus
from app.services import deliveries, tasks
from app.services.dispatch import dispatch_delivery, dispatch_step, dispatch_task
from app.services.errors import QueueFull, ValidationFailed, messages_to_errors
from app.services.representation import represent
from app.services.waiting import notify_final, parse_prefer_wait

bp = Blueprint("tasks", __name__, url_prefix="/v1/tasks")
log = logging.getLogger("waybill.api")


def _task_response(body: dict[str, Any], status: int, **headers: str) -> Response:
    response = jsonify(body)
    response.status_code = status
    for name, value in headers.items():
        response.headers[name] = value
    return response


@bp.post("")
def submit_task() -> Response:
    org_id = organization_id()
    body = json_body()
    try:
        data = SubmitTaskSchema().load(body)
    except ValidationError as exc:
        raise ValidationFailed(messages_to_errors(exc.messages)) from None
    header_key = request.headers.get("Idempotency-Key")
    key = data["idempotencyKey"]
    if header_key is not None:
        if key is not None and key != header_key:
            raise ValidationFailed(
                {"idempotencyKey": ["Differs from the Idempotency-Key header."]},
                "The Idempotency-Key header and the idempotencyKey field differ.",
            )
        try:
            SubmitTaskSchema(only=("idempotencyKey",)).load({"idempotencyKey": header_key})
        except ValidationError as exc:
            raise ValidationFailed(
                {"Idempotency-Key": messages_to_errors(exc.messages)["idempotencyKey"]}
            ) from None
        key = header_key
    wb = waybill()
    webhook_url = data["webhook"]["url"] if data["webhook"] else None
    if webhook_url is not None:
        from app.services import outbound

        try:
            outbound.check_url(webhook_url, allow_private=wb.settings.webhook_allow_private)
        except outbound.UnsafeTarget as exc:
            raise ValidationFailed(
                {"webhook.url": [str(exc)]}, f"The webhook URL is refused: {exc}."
            ) from None
    req = tasks.SubmitRequest(
        type=data["type"],
        input=data["input"],
        webhook_url=webhook_url,
        idempotency_key=key,
        metadata=data["metadata"],
    )
    try:
        with session() as s:
            submitted = tasks.submit(s, org_id, req, registry=wb.registry, request_id=g.request_id)
            representation = represent(submitted.task)
    except QueueFull as exc:
        with contextlib.suppress(redis.RedisError, RuntimeError):  # Redis away: the default estimate
            exc.set_retry_after(tasks.retry_after(wb.dispatcher.drain_rate(org_id)))
        raise
    location = f"/v1/tasks/{submitted.task.id}"
    wait = parse_prefer_wait(request.headers.get("Prefer"))
    if not submitted.created:
        SUBMISSIONS.labels("replayed").inc()
        log.info(
            "idempotent replay",
            extra={"event": "task.replayed", "task_id": submitted.task.id, "organization_id": org_id},
        )
        headers = {"Idempotent-Replayed": "true", "Location": location}
        if wait is not None:
            representation, _, applied = _hold(org_id, submitted.task.id, wait, representation)
            headers.update(applied)
        return _task_response(representation, 200, **headers)
    SUBMISSIONS.labels("accepted").inc()
    if wb.settings.fault_crash_after_commit and random.random() < wb.settings.fault_crash_after_commit:
        os._exit(70)  # chaos suite only: die between the SQL commit and dispatch
    dispatch_task(wb.dispatcher, wb.publisher, submitted.task.id, org_id, submitted.concurrency_limit)
    log.info(
        "task accepted",
        extra={
            "event": "task.accepted",
            "task_id": submitted.task.id,
            "organization_id": org_id,
            "type": req.type,
        },
    )
    headers = {"Location": location}
    status = 202
    if wait is not None:
        representation, final, applied = _hold(org_id, submitted.task.id, wait, representation)
        headers.update(applied)
        status = 200 if final else 202
    return _task_response(representation, status, **headers)


def _hold(
    org_id: str, task_id: str, seconds: int, current: dict[str, Any]
) -> tuple[dict[str, Any], bool, dict[str, str]]:
    """Wait up to ``seconds`` for the task to be final: (representation, final, headers)."""
    if TaskStatus(current["status"]).is_final:
        return current, True, {"Preference-Applied": f"wait={seconds}"}
    wb = waybill()
    latest = {"task": current}

    def is_final() -> bool:
        with read_session() as s:
            latest["task"] = represent(tasks.get_task(s, org_id, task_id))
        return TaskStatus(latest["task"]["status"]).is_final

    try:
        redis_client = wb.redis
    except RuntimeError:
        return current, False, {}
    waited = wb.waiter.wait(redis_client, task_id, seconds, is_final)
    if waited is None:
        return current, False, {}  # every waiting slot of this process is taken
    return latest["task"], waited, {"Preference-Applied": f"wait={seconds}"}


@bp.get("/<task_id>")
def get_task(task_id: str) -> Response:
    org_id = organization_id()
    with read_session() as s:
        representation = represent(tasks.get_task(s, org_id, task_id))
    wait = parse_prefer_wait(request.headers.get("Prefer"))
    if wait is None:
        return jsonify(representation)
    representation, _, headers = _hold(org_id, task_id, wait, representation)
    return _task_response(representation, 200, **headers)


@bp.get("")
def list_tasks() -> Response:
    org_id = organization_id()
    try:
        query = ListTasksQuery().load(request.args.to_dict())
    except ValidationError as exc:
        raise ValidationFailed(messages_to_errors(exc.messages)) from None
    with read_session() as s:
        rows, next_cursor = tasks.list_tasks(
            s,
            org_id,
            status=query.get("status"),
            type=query.get("type"),
            idempotency_key=query.get("idempotencyKey"),
            limit=query["limit"],
            cursor=query.get("cursor"),
        )
        return jsonify({"data": [represent(t) for t in rows], "nextCursor": next_cursor})


@bp.post("/<task_id>/cancel")
def cancel_task(task_id: str) -> Response:
    org_id = organization_id()
    wb = waybill()
    with session() as s:
        task, delivery_id, was_running = tasks.cancel(
            s, org_id, task_id, retention_days=wb.settings.result_retention_days
        )
        representation = represent(task)
    # Out of its waiting list, or its slot freed; if Redis is away the
    # claim refuses the canceled task and the lease expires by itself.
    with contextlib.suppress(redis.RedisError):
        wb.dispatcher.release(task_id, org_id)
    if was_running:
        try:
            wb.publisher.revoke(task_id)
        except Exception:  # best effort: its result is discarded anyway
            log.warning("revoke failed", extra={"event": "task.revoke_failed", "task_id": task_id})
    TASKS_FINISHED.labels(task.type, "canceled").inc()
    dispatch_delivery(wb.publisher, delivery_id)
    with contextlib.suppress(RuntimeError):  # no Redis configured at all
        notify_final(wb.redis, task_id, "canceled")
    dispatch_step(wb.dispatcher, wb.publisher)
    log.info("task canceled", extra={"event": "task.canceled", "task_id": task_id, "organization_id": org_id})
    return jsonify(representation)


@bp.get("/<task_id>/deliveries")
def list_deliveries(task_id: str) -> Response:
    org_id = organization_id()
    with read_session() as s:
        tasks.get_task(s, org_id, task_id)
        return jsonify({"data": deliveries.list_for_task(s, task_id)})


@bp.post("/<task_id>/deliveries")
def redeliver(task_id: str) -> Response:
    org_id = organization_id()
    wb = waybill()
    with session() as s:
        task = tasks.get_task(s, org_id, task_id)
        ids = deliveries.redeliver(s, task)
    for delivery_id in ids:
        dispatch_delivery(wb.publisher, delivery_id)
    with session() as s:
        body = {"data": deliveries.list_for_task(s, task_id)}
    response = jsonify(body)
    response.status_code = 202
    return response
