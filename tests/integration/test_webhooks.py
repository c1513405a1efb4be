"""Webhook delivery through real workers to a real receiver, verified with `standardwebhooks`."""

from __future__ import annotations

import itertools
import re
import signal
from collections.abc import Callable

import psutil
import pytest
from celery import Celery
from standardwebhooks.webhooks import Webhook

from app.celery_app import celery_config
from app.queues import DELIVER_WEBHOOK, WEBHOOKS_QUEUE
from config import Settings
from tests.support import Api, Process, Receiver, Stack, wait_for

pytestmark = pytest.mark.integration


def _deliveries(api: Api, task_id: str) -> list[dict]:
    r = api.http.get(f"{api.base_url}/v1/tasks/{task_id}/deliveries", timeout=10)
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def _wait_delivery(api: Api, task_id: str, statuses: set[str], timeout: float = 60) -> dict:
    return dict(
        wait_for(
            lambda: (d := _deliveries(api, task_id)) and d[0]["status"] in statuses and d[0],
            timeout,
            f"delivery of {task_id} to reach {statuses}",
            interval=0.1,
        )
    )


def _deliver_messages(worker: Process) -> tuple[set[str], set[str]]:
    """Celery ids of the deliver messages ``worker`` received, and of those it finished running."""
    received: set[str] = set()
    finished: set[str] = set()
    for record in worker.log_records():
        found = re.match(rf"Task {re.escape(DELIVER_WEBHOOK)}\[([^\]]+)\] ", record.get("message", ""))
        if found is None:
            continue
        if record.get("logger") == "celery.worker.strategy":
            received.add(found[1])
        elif record.get("logger") == "celery.app.trace":  # succeeded, raised, retried...
            finished.add(found[1])
    return received, finished


def _drain_webhooks(stack: Stack, worker: Process) -> None:
    """Return once ``worker`` has run every webhook message published so far.

    A marker message (for no delivery: it is skipped) goes into the webhooks
    queue behind whatever is there, a retry scheduled with a countdown
    included. The queue is first in, first out, so once the worker has run
    the marker it has received every earlier message (it holds a countdown's
    until due); then each of those must finish too.
    """
    config = celery_config(Settings.from_env(stack.env))
    config.pop("include")
    celery = Celery("test-marker")
    celery.conf.update(config)
    try:
        marker = celery.send_task(DELIVER_WEBHOOK, args=["msg_marker"], queue=WEBHOOKS_QUEUE).id
    finally:
        celery.close()
    wait_for(lambda: marker in _deliver_messages(worker)[1], 30, "the marker message to run")
    wait_for(lambda: (seen := _deliver_messages(worker))[0] <= seen[1], 30, "every webhook message to finish")


def test_signed_full_result_verified_with_old_and_new_secret(
    make_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    stack = make_stack()
    stack.web()
    stack.worker()
    stack.webhooks_worker()
    org = stack.org()
    api = Api(stack.base_url, org)
    old_secret = api.http.get(stack.base_url + "/v1/webhook-secret").json()["secret"]
    assert old_secret == org.webhook_secret
    new_secret = api.http.post(stack.base_url + "/v1/webhook-secret/rotate").json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != old_secret

    r = api.submit(
        {
            "type": "echo",
            "input": {"n": 1},
            "metadata": {"order": 7},
            "webhook": {"url": receiver.url + "/hook"},
        }
    )
    task_id = r.json()["taskId"]
    delivery = _wait_delivery(api, task_id, {"delivered"})
    assert len(receiver.received) == 1
    got = receiver.received[0]
    for secret in (old_secret, new_secret):  # each receiver holds only one of them
        event = Webhook(secret).verify(got.body, got.headers)
    assert got.headers["content-type"] == "application/json"
    assert got.headers["webhook-id"] == delivery["webhookId"]
    assert event["type"] == "task.succeeded"
    task = api.get(task_id)
    assert task["webhook"] == {
        "url": receiver.url + "/hook",
        "status": "delivered",
        "attempts": 1,
        "events": ["task.succeeded", "task.failed", "task.canceled"],
    }
    sent = event["data"]
    assert sent["taskId"] == task_id and sent["result"] == {"n": 1} and sent["metadata"] == {"order": 7}
    assert {k: v for k, v in sent.items() if k != "webhook"} == {
        k: v for k, v in task.items() if k != "webhook"
    }
    attempt = delivery["attempts"][0]
    assert attempt["attempt"] == 1 and attempt["outcome"] == "delivered" and attempt["responseStatus"] == 200

    # Deliver again on request: same webhook-id, one more attempt.
    r = api.http.post(f"{stack.base_url}/v1/tasks/{task_id}/deliveries")
    assert r.status_code == 202
    wait_for(lambda: len(receiver.received) == 2, 30, "the redelivery")
    assert receiver.received[1].headers["webhook-id"] == got.headers["webhook-id"]


def test_retry_schedule_doubles_and_the_fourth_attempt_lands(
    make_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    receiver.respond = lambda n: (500 if n <= 3 else 204, {}, b"no" if n <= 3 else b"", 0)
    stack = make_stack(WEBHOOK_RETRY_BASE_SECONDS="0.5")
    stack.web()
    stack.worker()
    stack.webhooks_worker()
    api = Api(stack.base_url, stack.org())
    task_id = api.submit({"type": "echo", "webhook": {"url": receiver.url}}).json()["taskId"]
    delivery = _wait_delivery(api, task_id, {"delivered", "failed"})
    assert delivery["status"] == "delivered"
    assert [a["outcome"] for a in delivery["attempts"]] == ["http_error"] * 3 + ["delivered"]
    assert [a["responseStatus"] for a in delivery["attempts"]] == [500, 500, 500, 204]
    ids = {r.headers["webhook-id"] for r in receiver.received}
    assert len(ids) == 1
    times = [r.at for r in receiver.received]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, want in zip(gaps, [0.5, 1.0, 2.0], strict=True):
        assert want * 0.9 <= gap <= want + 1.5, gaps
    assert api.get(task_id)["webhook"]["attempts"] == 4


@pytest.mark.parametrize(
    ("status", "attempts", "outcome"),
    [(500, 5, "http_error"), (410, 1, "gone"), (302, 5, "redirect")],
)
def test_failing_receivers_end_failed_after_the_right_number_of_attempts(
    make_stack: Callable[..., Stack], receiver: Receiver, status: int, attempts: int, outcome: str
) -> None:
    canary = Receiver()
    receiver.respond = lambda n: (
        status,
        {"Location": canary.url + "/elsewhere"} if status == 302 else {},
        b"x",
        0,
    )
    stack = make_stack(WEBHOOK_RETRY_BASE_SECONDS="0.2")
    stack.web()
    stack.worker()
    hooks = stack.webhooks_worker()
    api = Api(stack.base_url, stack.org())
    task_id = api.submit({"type": "echo", "webhook": {"url": receiver.url}}).json()["taskId"]
    delivery = _wait_delivery(api, task_id, {"failed"}, timeout=60)
    _drain_webhooks(stack, hooks)  # nothing more arrives after the final attempt
    assert len(receiver.received) == attempts
    assert len(delivery["attempts"]) == attempts
    assert {a["outcome"] for a in delivery["attempts"]} == {outcome}
    assert canary.received == []  # redirects are never followed
    canary.close()
    task = api.get(task_id)
    assert task["status"] == "succeeded"  # the task's own status is unchanged
    assert task["webhook"]["status"] == "failed"


def test_slow_and_huge_receivers_are_cut_at_the_deadline(
    make_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    huge = b"z" * (64 * 1024 * 1024)
    receiver.respond = lambda n: (200, {}, b"late", 5.0) if n == 1 else (200, {}, huge, 0)
    stack = make_stack(WEBHOOK_TIMEOUT_SECONDS="1", WEBHOOK_RETRY_BASE_SECONDS="0.2")
    stack.web()
    stack.worker()
    hooks = stack.webhooks_worker()
    api = Api(stack.base_url, stack.org())

    def pool_rss() -> int:
        return sum(c.memory_info().rss for c in psutil.Process(hooks.process.pid).children(recursive=True))

    before = pool_rss()
    task_id = api.submit({"type": "echo", "webhook": {"url": receiver.url}}).json()["taskId"]
    delivery = _wait_delivery(api, task_id, {"delivered", "failed"}, timeout=60)
    first, second = delivery["attempts"]
    assert first["outcome"] == "timeout" and first["durationMs"] < 1800
    assert second["outcome"] == "delivered" and second["durationMs"] < 1800
    assert pool_rss() - before < 32 * 1024 * 1024  # the 64 MiB answer was not read


def test_webhook_worker_killed_between_attempts_still_delivers_with_one_id(
    make_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    receiver.respond = lambda n: (503 if n == 1 else 200, {}, b"", 0)
    # A long first retry: the countdown message sits in the worker we kill.
    stack = make_stack(WEBHOOK_RETRY_BASE_SECONDS="3", SWEEP_GRACE_SECONDS="1")
    stack.web()
    stack.worker()
    doomed = stack.webhooks_worker()
    api = Api(stack.base_url, stack.org())
    task_id = api.submit({"type": "echo", "webhook": {"url": receiver.url}}).json()["taskId"]
    wait_for(lambda: len(receiver.received) == 1, 30, "the first attempt")
    wait_for(lambda: len(_deliveries(api, task_id)[0]["attempts"]) == 1, 10, "the first attempt's record")
    doomed.kill_group(signal.SIGKILL)
    doomed.process.wait(10)
    stack.beat()
    stack.webhooks_worker()
    delivery = _wait_delivery(api, task_id, {"delivered"}, timeout=60)
    assert [a["attempt"] for a in delivery["attempts"]] == [1, 2]
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    assert len(receiver.received) == 2


def test_the_first_attempt_goes_from_the_tasks_worker_and_retries_through_the_queue(
    make_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    """No webhooks worker yet: first attempts still arrive; a failed one waits for the queue."""
    receiver.respond = lambda n: (204, {}, b"", 0)
    stack = make_stack(WEBHOOK_RETRY_BASE_SECONDS="0.5")
    stack.web()
    tasks_worker = stack.worker(queues="tasks", concurrency=2)
    api = Api(stack.base_url, stack.org())
    ok = [
        api.submit({"type": "echo", "input": {"i": i}, "webhook": {"url": receiver.url + "/ok"}}).json()[
            "taskId"
        ]
        for i in range(6)
    ]
    for task_id in ok:
        assert (
            _wait_delivery(api, task_id, {"delivered"}, timeout=30)["attempts"][0]["outcome"] == "delivered"
        )
    sent_by = {r.get("webhook_id") for r in tasks_worker.log_records() if r.get("event") == "webhook.attempt"}
    assert len(sent_by) == 6  # each first attempt was the tasks worker's own

    # A receiver that fails the first attempt: recorded by the tasks worker,
    # its retry (countdown) goes to the webhooks queue, which nobody serves yet.
    receiver.respond = lambda n: (503, {}, b"", 0)
    failing = api.submit({"type": "echo", "webhook": {"url": receiver.url + "/down"}}).json()["taskId"]
    first = wait_for(
        lambda: (d := _deliveries(api, failing)) and d[0]["attempts"] and d[0], 30, "the first attempt"
    )
    assert [a["outcome"] for a in first["attempts"]] == ["http_error"]
    receiver.respond = lambda n: (204, {}, b"", 0)
    webhooks = stack.webhooks_worker()
    delivery = _wait_delivery(api, failing, {"delivered"}, timeout=30)
    assert [a["outcome"] for a in delivery["attempts"]] == ["http_error", "delivered"]
    assert any(r.get("event") == "webhook.attempt" for r in webhooks.log_records())
