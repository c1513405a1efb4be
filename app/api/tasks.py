"""``/v1/tasks``: submit, poll, list, cancel, and the webhook delivery log.

Each view parses, calls a use case (or a read), and represents the answer.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from marshmallow import ValidationError

from app.api.errors import from_service_error
from app.api.plumbing import (
    check_json_limits,
    json_body,
    organization_id,
    raw_json_body,
    read_session,
    waybill,
)
from app.api.schemas import (
    ListTasksQuery,
    SubmitBatchSchema,
    SubmitTaskSchema,
    cancel_after,
    cancel_after_header,
)
from app.models import TaskStatus
from app.services import deliveries, queries
from app.services.errors import ServiceError, ValidationFailed, messages_to_errors
from app.services.representation import represent
from app.services.submission import SubmitRequest
from app.services.waiting import parse_prefer_wait
from app.usecases import cancel, redeliver, submit

bp = Blueprint("tasks", __name__, url_prefix="/v1/tasks")


def _answer(body: Any, status: int = 200, **headers: str) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response


# One instance for every request: building a schema (its fields, the nested
# webhook schema) was about a tenth of a submission's time in the web process.
# load() keeps its state in locals, so threads can share it.
SUBMIT_SCHEMA = SubmitTaskSchema()


@bp.post("")
def submit_task() -> Response:
    org_id = organization_id()
    req = _submit_request(
        json_body(),
        request.headers.get("Idempotency-Key"),
        header_cancel_after=request.headers.get("Cancel-After"),
    )
    task, created = submit.submit(waybill(), org_id, req, request_id=g.request_id)
    headers = {"Location": f"/v1/tasks/{task['taskId']}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    wait = parse_prefer_wait(request.headers.get("Prefer"))
    if wait is not None:
        task, final, applied = _hold(org_id, task, wait)
        headers.update(applied)
        created = created and not final
    return _answer(task, 202 if created else 200, **headers)


@bp.post("/batch")
def submit_batch() -> Response:
    """``{"tasks": [...]}``: each item judged as ``POST /v1/tasks`` would judge it alone, in order.

    200 with one entry per item; the batch itself is refused only when it is
    not ``{"tasks": [1 to 1,000 items]}`` (400), too large (413) or not JSON
    (415). ``Prefer: wait`` does not apply; the ``Idempotency-Key`` header is
    refused (400): each item carries its own ``idempotencyKey``. A
    ``Cancel-After`` header applies to every item, as if each came alone
    with it (an item whose ``cancelAfter`` differs gets its own 400); a
    malformed one refuses the batch (400).
    """
    org_id = organization_id()
    raw_items = _batch_items()
    if "Idempotency-Key" in request.headers:
        raise ValidationFailed(
            {"Idempotency-Key": ["Not accepted on a batch: give each task its own idempotencyKey."]},
            "The Idempotency-Key header does not apply to a batch; give each task its own idempotencyKey.",
        )
    header_cancel_after = request.headers.get("Cancel-After")
    if header_cancel_after is not None:
        cancel_after_header(header_cancel_after)  # the batch's own header: malformed, the batch's 400
    items = [_batch_item(raw, SUBMIT_SCHEMA, header_cancel_after) for raw in raw_items]
    answers = submit.submit_many(waybill(), org_id, items, request_id=g.request_id)
    data: list[dict[str, Any]] = []
    for answer in answers:
        if isinstance(answer, ServiceError):
            # The very body the single submission's problem+json would have.
            data.append({"status": answer.status, "problem": from_service_error(answer).get_json()})
        else:
            task, created = answer
            data.append({"status": 202 if created else 200, "task": task})
    return _answer({"data": data})


def _batch_items() -> list[Any]:
    """The batch's items: 415 unless JSON, 413 over the size limit, 400 unless ``{"tasks": [...]}``.

    Read as ``json_body`` reads a submission, except for the JSON limits
    (depth, U+0000), which each item meets on its own (:func:`_batch_item`).
    """
    body = raw_json_body("tasks")
    if not isinstance(body, dict):
        raise ValidationFailed({"body": ['Must be a JSON object: {"tasks": [...]}.']})
    try:
        tasks: list[Any] = SubmitBatchSchema().load(body)["tasks"]
    except ValidationError as exc:
        raise ValidationFailed(messages_to_errors(exc.messages)) from None
    return tasks


def _batch_item(
    raw: Any, schema: SubmitTaskSchema, header_cancel_after: str | None = None
) -> SubmitRequest | ServiceError:
    """One item as a submission, or the 400 that body would get from ``POST /v1/tasks``.

    The same checks in the same order as ``json_body`` and :func:`_submit_request`,
    its fields named as in that body (``input.seconds``, not ``tasks.3.input.seconds``).
    """
    if not isinstance(raw, dict):
        return ValidationFailed({"body": ["Must be a JSON object."]})
    try:
        check_json_limits(raw)
        return _submit_request(raw, None, schema, header_cancel_after)
    except ValidationFailed as exc:
        return exc


def _submit_request(
    body: dict[str, Any],
    header_key: str | None,
    schema: SubmitTaskSchema | None = None,
    header_cancel_after: str | None = None,
) -> SubmitRequest:
    """The body as a submission; the ``Idempotency-Key`` and ``Cancel-After`` headers are aliases."""
    try:
        data = (schema or SUBMIT_SCHEMA).load(body)
    except ValidationError as exc:
        raise ValidationFailed(messages_to_errors(exc.messages)) from None
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
    return SubmitRequest(
        type=data["type"],
        input=data["input"],
        webhook_url=data["webhook"]["url"] if data["webhook"] else None,
        webhook_events=deliveries.stored_events(data["webhook"]["events"]) if data["webhook"] else None,
        idempotency_key=key,
        metadata=data["metadata"],
        cancel_after=cancel_after(data["cancelAfter"], header_cancel_after),
    )


def _hold(org_id: str, current: dict[str, Any], seconds: int) -> tuple[dict[str, Any], bool, dict[str, str]]:
    """``Prefer: wait``: up to ``seconds`` for the task to be final: (task, final, headers)."""
    applied = {"Preference-Applied": f"wait={seconds}"}
    if TaskStatus(current["status"]).is_final:
        return current, True, applied
    wb = waybill()
    latest = {"task": current}

    def is_final() -> bool:
        with read_session() as s:
            latest["task"] = represent(queries.get_task(s, org_id, current["taskId"]))
        return TaskStatus(latest["task"]["status"]).is_final

    try:
        redis_client = wb.redis
    except RuntimeError:
        return current, False, {}
    waited = wb.waiter.wait(redis_client, current["taskId"], seconds, is_final)
    if waited is None:
        return current, False, {}  # every waiting slot of this process is taken
    return latest["task"], waited, applied


@bp.get("/<task_id>")
def get_task(task_id: str) -> Response:
    org_id = organization_id()
    with read_session() as s:
        task = represent(queries.get_task(s, org_id, task_id))
    wait = parse_prefer_wait(request.headers.get("Prefer"))
    if wait is None:
        return _answer(task)
    task, _, headers = _hold(org_id, task, wait)
    return _answer(task, 200, **headers)


@bp.get("")
def list_tasks() -> Response:
    org_id = organization_id()
    try:
        query = ListTasksQuery().load(request.args.to_dict())
    except ValidationError as exc:
        raise ValidationFailed(messages_to_errors(exc.messages)) from None
    with read_session() as s:
        rows, next_cursor = queries.list_tasks(
            s,
            org_id,
            status=query.get("status"),
            type=query.get("type"),
            idempotency_key=query.get("idempotencyKey"),
            limit=query["limit"],
            cursor=query.get("cursor"),
        )
        return _answer({"data": [represent(t) for t in rows], "nextCursor": next_cursor})


@bp.post("/<task_id>/cancel")
def cancel_task(task_id: str) -> Response:
    return _answer(cancel.cancel(waybill(), organization_id(), task_id))


@bp.get("/<task_id>/deliveries")
def list_deliveries(task_id: str) -> Response:
    org_id = organization_id()
    with read_session() as s:
        queries.get_task(s, org_id, task_id)
        return _answer({"data": deliveries.list_for_task(s, task_id)})


@bp.post("/<task_id>/deliveries")
def redeliver_task(task_id: str) -> Response:
    return _answer({"data": redeliver.redeliver(waybill(), organization_id(), task_id)}, 202)
