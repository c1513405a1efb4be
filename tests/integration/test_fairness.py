"""Fair dispatch, per-organization concurrency, cancel and Prefer: wait, on real workers."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from sqlalchemy import func, select

from app.models import Task
from tests.support import Api, Receiver, Stack, wait_for

pytestmark = pytest.mark.integration


def _submit_many(api: Api, bodies: list[dict], threads: int = 16) -> list[str]:
    local = threading.local()

    def post(body: dict) -> str:
        if not hasattr(local, "s"):
            local.s = requests.Session()
            local.s.headers.update(api.org.headers)
        r = local.s.post(api.base_url + "/v1/tasks", json=body, timeout=60)
        assert r.status_code == 202, r.text
        return str(r.json()["taskId"])

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(post, bodies))


def _count(stack: Stack, org_id: str, status: str) -> int:
    with stack.db.session() as s:
        return int(
            s.execute(
                select(func.count()).where(Task.organization_id == org_id, Task.status == status)
            ).scalar_one()
        )


def test_a_newcomer_is_served_within_a_turn_of_a_big_backlog(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(DISPATCH_QUEUE_TARGET="2")
    stack.web()
    stack.worker(queues="tasks", concurrency=2)
    stack.webhooks_worker()  # runs beat's maintenance tasks, as the Procfile does
    stack.beat()
    a = Api(stack.base_url, stack.org("a", credits=10_000))
    b = Api(stack.base_url, stack.org("b", credits=100))
    _submit_many(a, [{"type": "sleep", "input": {"seconds": 0.2}} for _ in range(2000)])
    a_done_before = _count(stack, a.org.id, "succeeded")
    b_ids = _submit_many(b, [{"type": "sleep", "input": {"seconds": 0.2}} for _ in range(10)], threads=10)
    finished = [b.wait_status(task_id, {"succeeded"}, timeout=120) for task_id in b_ids]
    last_b_start = max(t["startedAt"] for t in finished)
    with stack.db.session() as s:
        b_started = [t for r in s.query(Task).filter(Task.id.in_(b_ids)) if (t := r.started_at) is not None]
        assert len(b_started) == len(b_ids)
        a_done_by_then = s.execute(
            select(func.count()).where(
                Task.organization_id == a.org.id,
                Task.status == "succeeded",
                Task.completed_at <= max(b_started),
            )
        ).scalar_one()
    assert last_b_start
    assert a_done_by_then - a_done_before < 40, (a_done_before, a_done_by_then)
    assert _count(stack, a.org.id, "queued") > 1000  # A's backlog was still there


def test_concurrency_limit_holds_while_another_organization_uses_the_rest(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(DISPATCH_QUEUE_TARGET="4")
    stack.web()
    stack.worker(queues="tasks", concurrency=4)
    stack.webhooks_worker()
    stack.beat()
    limited = Api(stack.base_url, stack.org("limited", concurrency_limit=2))
    other = Api(stack.base_url, stack.org("other"))
    _submit_many(limited, [{"type": "sleep", "input": {"seconds": 0.5}} for _ in range(12)])
    _submit_many(other, [{"type": "sleep", "input": {"seconds": 0.5}} for _ in range(12)])
    peak_limited = peak_other = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        peak_limited = max(peak_limited, _count(stack, limited.org.id, "running"))
        peak_other = max(peak_other, _count(stack, other.org.id, "running"))
        assert peak_limited <= 2
        if (
            _count(stack, limited.org.id, "succeeded") == 12
            and _count(stack, other.org.id, "succeeded") == 12
        ):
            break
        time.sleep(0.05)
    assert _count(stack, limited.org.id, "succeeded") == 12
    assert peak_limited == 2
    assert peak_other >= 2  # the other organization used the free workers


def test_a_killed_worker_gives_its_slots_back_within_the_lease(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(TASK_LEASE_SECONDS="3")
    stack.web()
    doomed = stack.worker("doomed", queues="tasks", concurrency=2)
    stack.webhooks_worker()
    stack.beat()
    api = Api(stack.base_url, stack.org(concurrency_limit=2))
    ids = _submit_many(api, [{"type": "sleep", "input": {"seconds": 1}} for _ in range(6)])
    wait_for(lambda: _count(stack, api.org.id, "running") == 2, 30, "two running tasks")
    doomed.kill_group(signal.SIGKILL)
    doomed.process.wait(10)
    killed_at = time.monotonic()
    stack.worker("rescuer", queues="tasks", concurrency=2)
    wait_for(lambda: _count(stack, api.org.id, "running") >= 1, 30, "the slots to come back")
    assert time.monotonic() - killed_at < 3 + 10  # lease + worker start-up and a sweep
    for task_id in ids:
        assert api.wait_status(task_id, {"succeeded", "failed"}, timeout=60)["status"] == "succeeded"


def test_cancel_a_waiting_task_it_never_runs_and_its_webhook_says_canceled(
    make_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    stack = make_stack()
    stack.web()
    stack.worker(queues="tasks", concurrency=2)
    stack.webhooks_worker()
    stack.beat()
    api = Api(stack.base_url, stack.org(concurrency_limit=1, credits=10))
    blocker = api.submit({"type": "sleep", "input": {"seconds": 3}}).json()["taskId"]
    api.wait_status(blocker, {"running"}, timeout=30)
    waiting = api.submit({"type": "echo", "input": 1, "webhook": {"url": receiver.url}}).json()["taskId"]
    r = api.http.post(f"{stack.base_url}/v1/tasks/{waiting}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert api.http.get(stack.base_url + "/v1/organization").json()["credits"] == 9  # only the blocker
    # A task submitted after the cancel waits behind where the canceled one
    # was (an organization's tasks leave its waiting list in order, and one
    # at a time here): once it has run, the blocker's freed slot went past
    # the canceled task.
    after = api.submit({"type": "echo", "input": 2}).json()["taskId"]
    wait_for(lambda: receiver.received, 30, "the task.canceled webhook")
    assert receiver.events()[0]["type"] == "task.canceled"
    assert receiver.events()[0]["data"]["status"] == "canceled"
    assert api.wait_status(blocker, {"succeeded"}, timeout=30)
    assert api.wait_status(after, {"succeeded"}, timeout=30)
    task = api.get(waiting)
    assert task["status"] == "canceled" and task["startedAt"] is None and "result" not in task
    assert api.http.post(f"{stack.base_url}/v1/tasks/{blocker}/cancel").status_code == 409
    assert api.http.post(f"{stack.base_url}/v1/tasks/{waiting}/cancel").status_code == 409


def test_cancel_a_running_task_discards_its_result(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.web()
    worker = stack.worker(queues="tasks", concurrency=2)
    api = Api(stack.base_url, stack.org(credits=10))
    task_id = api.submit({"type": "sleep", "input": {"seconds": 2}}).json()["taskId"]
    api.wait_status(task_id, {"running"}, timeout=30)
    pool = set(psutil.Process(worker.pid).children())
    assert api.http.post(f"{stack.base_url}/v1/tasks/{task_id}/cancel").json()["status"] == "canceled"

    def run_ended() -> bool:
        # The cancel's revoke SIGTERMs the pool process running the task (the
        # pool starts another in its place); were the revoke lost, the run
        # would end after its 2 s and the runner would log its outcome.
        replaced = bool(pool - set(psutil.Process(worker.pid).children()))
        logged = any(
            r.get("task_id") == task_id and r.get("event") in ("task.finished", "task.discarded")
            for r in worker.log_records()
        )
        return replaced or logged

    wait_for(run_ended, 30, "the canceled task's run to end")
    task = api.get(task_id)
    assert task["status"] == "canceled" and "result" not in task
    assert api.http.get(stack.base_url + "/v1/organization").json()["credits"] == 10


def test_prefer_wait(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.web()
    stack.worker(queues="tasks", concurrency=2)
    api = Api(stack.base_url, stack.org())
    r = api.submit({"type": "echo", "input": {"x": 1}}, Prefer="wait=5")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded" and r.json()["result"] == {"x": 1}
    assert r.headers["Preference-Applied"] == "wait=5"
    started = time.monotonic()
    r = api.submit({"type": "sleep", "input": {"seconds": 10}}, Prefer="wait=5")
    elapsed = time.monotonic() - started
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
    assert 4.5 <= elapsed < 8
    task_id = r.json()["taskId"]
    r = api.http.get(f"{stack.base_url}/v1/tasks/{task_id}", headers={"Prefer": "wait=10"}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "succeeded"
