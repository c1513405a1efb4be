"""The Python SDK (clients/python, ``waybill_client``) against a real Waybill.

gunicorn, Celery workers, Redis and SQL as in the other integration tests;
every answer here is the server's own. Events, progress, ``cancelAfter`` and
the webhooks of ``webhook.events`` are in ``test_sdk_live.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from waybill_client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    IdempotencyConflict,
    InsufficientCredits,
    NotFound,
    Submission,
    Task,
    TaskWebhook,
    Unauthorized,
    WaitTimeout,
    WebhookVerificationError,
    verify_webhook,
)
from waybill_client._core import submission_body

from tests.support import Receiver, Stack, wait_for

pytestmark = pytest.mark.integration


def test_submit_wait_get_and_the_organization(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.web()
    stack.worker()
    org = stack.org(credits=100)
    with Client(stack.base_url, org.api_key, timeout=30) as wb:
        echo = wb.submit("echo", {"hello": ["world", 1, None]}, metadata={"order": 7})
        assert echo.status == "queued" and echo.type == "echo" and echo.cost == 1
        assert uuid.UUID(echo.idempotency_key or "").version == 4  # generated: the submission is retry-safe
        assert echo.created_at is not None and echo.created_at.tzinfo is not None
        assert abs(echo.created_at - datetime.now(UTC)) < timedelta(minutes=5)
        sleep = wb.submit("sleep", {"seconds": 1.5}, idempotency_key="sleep-1")

        done = wb.wait(echo.task_id, timeout=60)
        assert done.status == "succeeded" and done.result == {"hello": ["world", 1, None]}
        assert done.metadata == {"order": 7} and done.error is None
        assert done.started_at is not None and done.completed_at is not None
        assert done.created_at == echo.created_at <= done.started_at <= done.completed_at

        slept = wb.wait(sleep.task_id, timeout=60)
        assert slept.status == "succeeded" and slept.result["sleptSeconds"] >= 1.5
        assert slept.idempotency_key == "sleep-1"
        assert wb.get(sleep.task_id) == slept  # compares every field but raw

        organization = wb.organization()
        assert organization.id == org.id and organization.name == "acme"
        assert organization.credits == 98 and organization.queued == 0 and organization.running == 0
        assert organization.concurrency_limit == 10 and organization.queue_limit == 100_000
        assert {t.type: t.cost for t in wb.task_types()}["echo"] == 1


def test_wait_times_out_and_cancel(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.web()
    stack.worker()
    org = stack.org(credits=100, concurrency_limit=1)
    with Client(stack.base_url, org.api_key) as wb:
        long = wb.submit("sleep", {"seconds": 60})
        wait_for(lambda: wb.get(long.task_id).status == "running", 30, "the long sleep to run")
        queued = wb.submit("echo", {"n": 1})  # behind the long sleep: the organization runs one at a time

        started = datetime.now(UTC)
        with pytest.raises(WaitTimeout) as caught:
            wb.wait(queued.task_id, timeout=2.5)
        assert timedelta(seconds=2.4) <= datetime.now(UTC) - started < timedelta(seconds=10)
        assert caught.value.task is not None and caught.value.task.status == "queued"

        canceled = wb.cancel(queued.task_id)
        assert canceled.status == "canceled" and canceled.task_id == queued.task_id
        assert canceled.error is not None and canceled.error.code == "canceled"
        assert wb.wait(queued.task_id, timeout=5).status == "canceled"
        with pytest.raises(Conflict) as conflict:
            wb.cancel(queued.task_id)
        assert conflict.value.status == 409 and conflict.value.detail

        assert wb.cancel(long.task_id).status == "canceled"  # the running one, revoked best-effort
        organization = wb.organization()
        assert organization.credits == 100  # both refunded


def test_batches_lists_and_idempotency(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.web()
    stack.worker()
    org = stack.org(credits=100)
    with Client(stack.base_url, org.api_key) as wb:
        items = wb.submit_many(
            [
                Submission("echo", {"i": 0}, metadata={"batch": True}),
                {"type": "echo", "input": {"i": 1}, "idempotencyKey": "batch-1"},
                {"type": "sleep", "input": {"seconds": 301}},
                {"type": "no-such-type"},
                Submission("echo", {"i": 4}, webhook="ftp://example.com/"),
            ]
        )
        assert [i.status for i in items] == [202, 202, 400, 400, 400]
        assert [i.ok for i in items] == [True, True, False, False, False]
        first, keyed = items[0].task, items[1].task
        assert first is not None and keyed is not None
        assert first.status == "queued" and first.metadata == {"batch": True}
        assert keyed.idempotency_key == "batch-1"
        assert uuid.UUID(first.idempotency_key or "").version == 4
        bad_input = items[2].error
        assert isinstance(bad_input, BadRequest) and bad_input.errors and "input.seconds" in bad_input.errors
        assert items[3].problem is not None and items[3].problem.errors and "type" in items[3].problem.errors
        assert isinstance(items[4].error, BadRequest)

        # The keyed item again: the same task (200), nothing new.
        again = wb.submit_many([{"type": "echo", "input": {"i": 1}, "idempotencyKey": "batch-1"}])
        assert again[0].status == 200 and again[0].task is not None
        assert again[0].task.task_id == keyed.task_id

        # The generated key makes a repeated POST harmless: the same body sent
        # twice (as a retry after a lost answer would) is one task.
        body = submission_body(
            "echo", {"retry": 1}, webhook=None, idempotency_key=None, metadata=None, cancel_after=None
        )
        first_send = wb._send("POST", "/v1/tasks", json=body, idempotent=True)
        second_send = wb._send("POST", "/v1/tasks", json=body, idempotent=True)
        assert (first_send.status_code, second_send.status_code) == (202, 200)
        assert second_send.headers["Idempotent-Replayed"] == "true"
        assert first_send.json()["taskId"] == second_send.json()["taskId"]
        assert [t.task_id for t in wb.list(idempotency_key=body["idempotencyKey"])] == [
            first_send.json()["taskId"]
        ]
        with pytest.raises(IdempotencyConflict) as reused:
            wb.submit("echo", {"retry": 2}, idempotency_key=body["idempotencyKey"])
        assert reused.value.idempotency_key == body["idempotencyKey"]

        submitted = [wb.submit("echo", {"n": n}) for n in range(7)]
        for task in submitted:
            assert wb.wait(task.task_id, timeout=60).status == "succeeded"
        for task_id in (first.task_id, keyed.task_id, first_send.json()["taskId"]):
            assert wb.wait(task_id, timeout=60).status == "succeeded"

        everything = list(wb.list(limit=3))  # 10 tasks: 4 pages of at most 3
        ids = [t.task_id for t in everything]
        assert len(ids) == len(set(ids)) == 10
        assert {t.task_id for t in submitted} | {first.task_id, keyed.task_id} <= set(ids)
        created = [t.created_at for t in everything]
        assert all(c is not None for c in created)
        assert created == sorted(created, reverse=True)  # type: ignore[type-var]  # newest first
        assert set(ids[:7]) == {t.task_id for t in submitted}  # the latest
        assert {t.status for t in wb.list(status="succeeded", type="echo", limit=2)} == {"succeeded"}
        assert len(list(wb.list(status="succeeded", type="echo", limit=2))) == 10
        assert list(wb.list(status="queued")) == []
        assert wb.organization().credits == 90


def test_problems_of_real_answers(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.web()
    org = stack.org(credits=1)
    with Client(stack.base_url, "wb_not_a_key") as stranger, pytest.raises(Unauthorized) as denied:
        stranger.organization()
    assert denied.value.status == 401 and denied.value.type == "urn:waybill:problem:unauthorized"
    assert denied.value.title and "unknown or revoked" in denied.value.detail

    with Client(stack.base_url, org.api_key) as wb:
        with pytest.raises(BadRequest) as bad:
            wb.submit("sleep", {"seconds": -1})
        assert (
            bad.value.status == 400 and bad.value.errors is not None and "input.seconds" in bad.value.errors
        )
        with pytest.raises(BadRequest) as unknown:
            wb.submit("no-such-type")
        assert unknown.value.errors is not None and "type" in unknown.value.errors

        with pytest.raises(NotFound) as missing:
            wb.get("01JDX0000000000000000000000")
        assert missing.value.status == 404
        with pytest.raises(NotFound):
            wb.cancel("nope")
        with pytest.raises(NotFound):
            wb.deliveries("nope")

    poor = stack.org("poor", credits=0)
    with Client(stack.base_url, poor.api_key) as wb, pytest.raises(InsufficientCredits) as broke:
        wb.submit("echo", {"n": 1})
    assert broke.value.status == 402 and broke.value.balance == 0 and broke.value.cost == 1
    assert "balance" in broke.value.detail


def test_async_client(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.web()
    stack.worker()
    org = stack.org(credits=100)

    async def main() -> None:
        async with AsyncClient(stack.base_url, org.api_key) as wb:
            tasks = await asyncio.gather(*(wb.submit("echo", {"n": n}) for n in range(4)))
            done = await asyncio.gather(*(wb.wait(t.task_id, timeout=60) for t in tasks))
            assert [d.result for d in done] == [{"n": n} for n in range(4)]
            assert all(isinstance(d, Task) and d.status == "succeeded" for d in done)
            assert await wb.get(tasks[0].task_id) == done[0]

            items = await wb.submit_many(
                [Submission("echo", "a"), {"type": "sleep", "input": {"seconds": "x"}}]
            )
            assert [i.status for i in items] == [202, 400]
            assert items[0].task is not None
            await wb.wait(items[0].task.task_id, timeout=60)

            listed = [t.task_id async for t in wb.list(type="echo", limit=2)]
            assert len(listed) == 5 and listed[0] == items[0].task.task_id

            with pytest.raises(NotFound):
                await wb.get("nope")
            with pytest.raises(Conflict):
                await wb.cancel(tasks[0].task_id)
            assert (await wb.organization()).credits == 95

    asyncio.run(main())


def test_verify_webhook_on_a_real_delivery(make_stack: Callable[..., Stack], receiver: Receiver) -> None:
    stack = make_stack()
    stack.web()
    stack.worker()
    stack.webhooks_worker()
    org = stack.org()
    with Client(stack.base_url, org.api_key) as wb:
        secret = wb.webhook_secret()
        assert secret == org.webhook_secret and secret.startswith("whsec_")
        task = wb.submit("echo", {"n": 1}, webhook={"url": receiver.url + "/hook"}, metadata={"m": 1})
        assert task.webhook is not None and task.webhook.url == receiver.url + "/hook"
        assert receiver.wait_for_task(task.task_id, 60) is not None
        got = receiver.received[0]

        event = verify_webhook(got.body, got.headers, secret)
        assert event.type == "task.succeeded" and event.webhook_id == got.headers["webhook-id"]
        assert event.task.task_id == task.task_id and event.task.result == {"n": 1}
        assert event.task.metadata == {"m": 1} and event.task.status == "succeeded"
        assert event.timestamp is not None and abs(event.timestamp - datetime.now(UTC)) < timedelta(minutes=1)
        assert verify_webhook(got.body.decode(), got.headers, secret).webhook_id == event.webhook_id

        tampered = got.body.replace(b'"n":1', b'"n":2')
        assert tampered != got.body
        with pytest.raises(WebhookVerificationError):
            verify_webhook(tampered, got.headers, secret)
        other = Client(stack.base_url, stack.org("other").api_key)
        with other, pytest.raises(WebhookVerificationError):
            verify_webhook(got.body, got.headers, other.webhook_secret())

        deliveries = wait_for(
            lambda: (d := wb.deliveries(task.task_id)) and d[0].status == "delivered" and d,
            30,
            "the delivery to be recorded",
        )
        assert len(deliveries) == 1
        delivery = deliveries[0]
        assert delivery.webhook_id == event.webhook_id and delivery.event == "task.succeeded"
        assert delivery.url == receiver.url + "/hook"
        assert [(a.attempt, a.outcome, a.response_status) for a in delivery.attempts] == [
            (1, "delivered", 200)
        ]
        default = ("task.succeeded", "task.failed", "task.canceled")
        assert wb.get(task.task_id).webhook == TaskWebhook(receiver.url + "/hook", "delivered", 1, default)
