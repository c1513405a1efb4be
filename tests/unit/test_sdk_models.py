"""waybill_client's typed results, request bodies and problem+json mapping (no server)."""

from __future__ import annotations

import pickle
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import waybill_client
from waybill_client import (
    ApiError,
    BadRequest,
    BatchItem,
    Conflict,
    Delivery,
    IdempotencyConflict,
    InsufficientCredits,
    NotFound,
    Organization,
    PayloadTooLarge,
    PaymentRequired,
    Problem,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Submission,
    Task,
    Unauthorized,
    UnexpectedResponse,
    UnsupportedMediaType,
    WaitTimeout,
    WaybillError,
)
from waybill_client._core import (
    batch_body,
    json_of,
    list_params,
    page_of,
    prefer_wait_seconds,
    submission_body,
)
from waybill_client.errors import error_from_response, parse_retry_after

FULL_TASK: dict[str, Any] = {
    "taskId": "01JDXAAAAAAAAAAAAAAAAAAAAA",
    "type": "echo",
    "status": "failed",
    "input": {"a": [1, None]},
    "result": None,
    "error": {"code": "boom", "message": "it broke"},
    "idempotencyKey": "order-123",
    "metadata": {"order": 123},
    "cost": 2,
    "webhook": {"url": "https://example.com/hook", "status": "delivered", "attempts": 1},
    "progress": {"fraction": 0.4, "message": "page 4 of 10", "updatedAt": "2026-11-28T09:45:15.000Z"},
    "cancelAfter": 300,
    "createdAt": "2026-11-28T09:45:16.123Z",
    "startedAt": "2026-11-28T09:45:17.000Z",
    "completedAt": None,
    # Members a newer server might send: ignored, kept in raw.
    "expiresAt": "2026-12-28T09:45:16.123Z",
    "somethingNew": {"x": 1},
}


def test_task_from_the_full_representation() -> None:
    task = Task.from_json(FULL_TASK)
    assert task.task_id == "01JDXAAAAAAAAAAAAAAAAAAAAA" and task.type == "echo" and task.status == "failed"
    assert task.input == {"a": [1, None]} and task.result is None
    assert task.error is not None and (task.error.code, task.error.message) == ("boom", "it broke")
    assert task.idempotency_key == "order-123" and task.metadata == {"order": 123} and task.cost == 2
    assert task.webhook is not None
    assert (task.webhook.url, task.webhook.status, task.webhook.attempts) == (
        "https://example.com/hook",
        "delivered",
        1,
    )
    assert task.progress is not None
    assert (task.progress.fraction, task.progress.message) == (0.4, "page 4 of 10")
    assert task.progress.updated_at == datetime(2026, 11, 28, 9, 45, 15, tzinfo=UTC)
    assert task.cancel_after == 300
    assert task.created_at == datetime(2026, 11, 28, 9, 45, 16, 123000, tzinfo=UTC)
    assert task.created_at.utcoffset() is not None
    assert task.started_at == datetime(2026, 11, 28, 9, 45, 17, tzinfo=UTC)
    assert task.completed_at is None
    assert task.is_final
    assert task.raw["somethingNew"] == {"x": 1} and not hasattr(task, "expires_at")


def test_task_with_absent_members() -> None:
    task = Task.from_json({"taskId": "t", "type": "sleep", "status": "queued", "cost": 1, "createdAt": None})
    assert task.error is None and task.webhook is None and task.progress is None
    assert task.cancel_after is None and task.created_at is None and task.metadata is None
    assert not task.is_final
    assert (
        Task.from_json({"taskId": "t", "type": "x", "status": "running", "progress": None}).progress is None
    )
    with pytest.raises(KeyError):
        Task.from_json({"type": "echo", "status": "queued"})
    with pytest.raises(ValueError):
        Task.from_json(["not", "an", "object"])


def test_task_is_frozen() -> None:
    task = Task.from_json(FULL_TASK)
    with pytest.raises(AttributeError):
        task.status = "succeeded"  # type: ignore[misc]


def test_progress_fraction_may_be_null() -> None:
    task = Task.from_json({**FULL_TASK, "progress": {"fraction": None, "message": None, "updatedAt": None}})
    assert task.progress is not None and task.progress.fraction is None and task.progress.message is None


def test_delivery_reads_event_and_its_older_name() -> None:
    attempt = {
        "attempt": 1,
        "at": "2026-11-28T09:45:16.123Z",
        "outcome": "http_500",
        "responseStatus": 500,
        "durationMs": 12,
        "error": None,
        "extra": True,
    }
    documented = Delivery.from_json(
        {
            "webhookId": "msg_1",
            "event": "task.succeeded",
            "url": "u",
            "status": "failed",
            "attempts": [attempt],
        }
    )
    assert documented.event == "task.succeeded" and documented.webhook_id == "msg_1"
    assert documented.attempts[0].response_status == 500 and documented.attempts[0].duration_ms == 12
    assert documented.attempts[0].at == datetime(2026, 11, 28, 9, 45, 16, 123000, tzinfo=UTC)
    older = Delivery.from_json(
        {"webhookId": "msg_2", "eventType": "task.failed", "url": "u", "status": "pending"}
    )
    assert older.event == "task.failed" and older.attempts == ()


def test_organization() -> None:
    org = Organization.from_json(
        {
            "id": "org_1",
            "name": "acme",
            "credits": 5,
            "queueLimit": 10,
            "queued": 2,
            "running": 1,
            "concurrencyLimit": 3,
            "new": 1,
        }
    )
    assert (
        org.id,
        org.name,
        org.credits,
        org.queue_limit,
        org.queued,
        org.running,
        org.concurrency_limit,
    ) == (
        "org_1",
        "acme",
        5,
        10,
        2,
        1,
        3,
    )


def test_batch_items() -> None:
    accepted = BatchItem.from_json({"status": 202, "task": FULL_TASK})
    assert accepted.ok and accepted.task is not None and accepted.problem is None and accepted.error is None
    refused = BatchItem.from_json(
        {
            "status": 402,
            "problem": {
                "type": "urn:waybill:problem:insufficient-credits",
                "title": "Not enough credits",
                "status": 402,
                "detail": "This task costs 2 credits and the organization's balance is 1.",
                "balance": 1,
                "cost": 2,
            },
        }
    )
    assert not refused.ok and refused.task is None and refused.problem is not None
    error = refused.error
    assert isinstance(error, InsufficientCredits) and error.balance == 1 and error.cost == 2


def test_submission_body_fields_and_generated_key() -> None:
    body = submission_body(
        "sleep",
        {"seconds": 1},
        webhook="https://example.com/h",
        idempotency_key=None,
        metadata={"m": 1},
        cancel_after=90,
    )
    key = body.pop("idempotencyKey")
    assert uuid.UUID(key).version == 4
    assert body == {
        "type": "sleep",
        "input": {"seconds": 1},
        "webhook": {"url": "https://example.com/h"},
        "metadata": {"m": 1},
        "cancelAfter": 90,
    }
    events = {"url": "https://example.com/h", "events": ["task.progress", "task.succeeded"]}
    given = submission_body(
        "echo", None, webhook=events, idempotency_key="k-1", metadata=None, cancel_after=None
    )
    assert given == {"type": "echo", "webhook": events, "idempotencyKey": "k-1"}
    other = submission_body(
        "echo", None, webhook=None, idempotency_key=None, metadata=None, cancel_after=None
    )
    assert other["idempotencyKey"] != key


def test_batch_body_keeps_given_keys_and_generates_the_others() -> None:
    body = batch_body(
        [
            Submission("echo", {"i": 0}, cancel_after=5),
            {"type": "echo", "input": {"i": 1}, "idempotencyKey": "mine"},
            {"type": "echo", "input": {"i": 2}, "idempotencyKey": None},
        ]
    )
    tasks = body["tasks"]
    assert tasks[0]["cancelAfter"] == 5 and tasks[1]["idempotencyKey"] == "mine"
    generated = [tasks[0]["idempotencyKey"], tasks[2]["idempotencyKey"]]
    assert all(uuid.UUID(k).version == 4 for k in generated) and generated[0] != generated[1]
    with pytest.raises(ValueError, match="1 to 1000"):
        batch_body([])
    with pytest.raises(ValueError, match="1 to 1000"):
        batch_body([Submission("echo")] * 1001)
    with pytest.raises(TypeError):
        batch_body(["echo"])  # type: ignore[list-item]


def test_list_params_and_pages() -> None:
    assert list_params("queued", "echo", "k", 5) == {
        "status": "queued",
        "type": "echo",
        "idempotencyKey": "k",
        "limit": "5",
    }
    assert list_params(None, None, None, None) == {}
    page = page_of({"data": [FULL_TASK], "nextCursor": None})
    assert page.next_cursor is None and page.tasks[0].task_id == FULL_TASK["taskId"]
    with pytest.raises(UnexpectedResponse):
        page_of({"items": []})


def test_prefer_wait_seconds() -> None:
    assert [prefer_wait_seconds(r) for r in (-3, 0.5, 0.95, 1.8, 29.95, 59.5, 60, 3600)] == [
        0,
        0,
        1,
        1,
        30,
        59,
        60,
        60,
    ]


def _response(
    status: int, body: Any = None, *, headers: dict[str, str] | None = None, text: str = ""
) -> httpx.Response:
    request = httpx.Request("POST", "http://waybill.test/v1/tasks")
    if body is not None:
        return httpx.Response(
            status,
            json=body,
            headers={"content-type": "application/problem+json", **(headers or {})},
            request=request,
        )
    return httpx.Response(status, text=text, headers=headers, request=request)


def _problem(status: int, slug: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": f"urn:waybill:problem:{slug}",
        "title": slug,
        "status": status,
        "detail": f"d{status}",
        **extra,
    }


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (402, InsufficientCredits),
        (404, NotFound),
        (409, Conflict),
        (413, PayloadTooLarge),
        (415, UnsupportedMediaType),
        (422, IdempotencyConflict),
        (429, RateLimited),
        (503, ServiceUnavailable),
        (500, ServerError),
        (502, ServerError),
        (405, ApiError),
        (418, ApiError),
    ],
)
def test_status_maps_to_its_exception(status: int, cls: type[ApiError]) -> None:
    error = error_from_response(_response(status, _problem(status, "x")))
    assert type(error) is cls
    assert isinstance(error, ApiError) and isinstance(error, WaybillError)
    assert (error.status, error.title, error.detail, error.type) == (
        status,
        "x",
        f"d{status}",
        "urn:waybill:problem:x",
    )
    assert str(error) == f"{status} x: d{status}"


def test_class_hierarchy() -> None:
    assert issubclass(InsufficientCredits, PaymentRequired)
    assert issubclass(ServiceUnavailable, ServerError)
    assert issubclass(WaitTimeout, WaybillError)


def test_problem_members_and_extensions() -> None:
    error = error_from_response(
        _response(
            400, _problem(400, "validation-error", errors={"input.seconds": ["Too big."], "type": "bad"})
        )
    )
    assert isinstance(error, BadRequest)
    assert error.errors == {"input.seconds": ["Too big."], "type": ["bad"]}
    credits = error_from_response(_response(402, _problem(402, "insufficient-credits", balance=0, cost=2)))
    assert credits.balance == 0 and credits.cost == 2 and credits.extensions == {"balance": 0, "cost": 2}
    assert credits.queue_limit is None and credits.retry_after is None
    full = error_from_response(
        _response(
            429,
            _problem(429, "queue-full", queued=10, queueLimit=10, someThing=1),
            headers={"Retry-After": "7"},
        )
    )
    assert isinstance(full, RateLimited)
    assert full.retry_after == 7.0 and full.queued == 10 and full.queue_limit == 10
    assert full.some_thing == 1 and full.someThing == 1
    with pytest.raises(AttributeError):
        _ = full.not_a_member
    reused = error_from_response(_response(422, _problem(422, "idempotency-key-reused", idempotencyKey="k")))
    assert reused.idempotency_key == "k"


def test_errors_survive_pickling() -> None:
    error = error_from_response(_response(402, _problem(402, "insufficient-credits", balance=3)))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is InsufficientCredits and copy.balance == 3 and str(copy) == str(error)


def test_answer_that_is_not_a_problem() -> None:
    error = error_from_response(
        _response(502, text="<html>Bad Gateway</html>", headers={"content-type": "text/html"})
    )
    assert isinstance(error, ServerError) and error.status == 502
    assert error.type == "about:blank" and error.title == "Bad Gateway" and "Bad Gateway" in error.detail
    # A problem whose status member disagrees with the answer: the answer's status decides.
    wrong = error_from_response(_response(404, {"type": "t", "title": "x", "status": 500, "detail": ""}))
    assert isinstance(wrong, NotFound) and wrong.status == 404


def test_json_of_a_non_json_answer() -> None:
    with pytest.raises(UnexpectedResponse, match="without JSON"):
        json_of(_response(200, text="ok"))


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    when = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    now = datetime(2030, 1, 1, 0, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("Tue, 01 Jan 2030 00:00:30 GMT", now=now) == (when.timestamp() - now)
    assert parse_retry_after("Tue, 01 Jan 2030 00:00:30 GMT", now=now + 60) == 0.0


def test_problem_from_json_tolerates_odd_members() -> None:
    problem = Problem.from_json({"status": "x", "errors": ["not a map"]})
    assert problem.status == 0 and problem.errors is None and problem.type == "about:blank"


def test_public_names() -> None:
    assert waybill_client.__version__ == "0.1.0"
    for name in waybill_client.__all__:
        assert hasattr(waybill_client, name), name
    assert "Client" in waybill_client.__all__ and "verify_webhook" in waybill_client.__all__
