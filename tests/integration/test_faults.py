"""Faults on real processes: a worker SIGKILLed mid-task, Redis down at submission."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import psutil
import pytest
from sqlalchemy import func, select

from app.embedded_redis import EmbeddedRedis
from app.models import CreditEntry, Task
from tests.support import Api, Stack

pytestmark = pytest.mark.integration


def test_sigkilled_worker_task_runs_again_and_records_one_result(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.web()
    doomed = stack.worker("doomed")
    org = stack.org()
    api = Api(stack.base_url, org)
    task_id = api.submit({"type": "sleep", "input": {"seconds": 2}}).json()["taskId"]
    api.wait_status(task_id, {"running"}, timeout=30)

    doomed.kill_group(signal.SIGKILL)  # the main process and its pool children
    doomed.process.wait(10)
    stack.beat()
    stack.worker("rescuer")

    task = api.wait_status(task_id, {"succeeded", "failed"}, timeout=60)
    assert task["status"] == "succeeded", task
    assert task["result"]["sleptSeconds"] >= 2
    with stack.db.session() as s:
        row = s.get(Task, task_id)
        assert row is not None
        assert row.attempts == 2  # the killed run, then the one that finished
        charges = s.execute(select(func.count()).where(CreditEntry.task_id == task_id)).scalar_one()
    assert charges == 1  # reserved once, never refunded
    assert api.http.get(stack.base_url + "/v1/organization").json()["running"] == 0


def test_worker_child_killed_three_times_fails_the_task_with_a_clear_error(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.web()
    stack.beat()
    stack.worker(concurrency=1)
    org = stack.org()
    api = Api(stack.base_url, org)
    task_id = api.submit({"type": "sleep", "input": {"seconds": 30}}).json()["taskId"]
    killed = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        task = api.get(task_id)
        if task["status"] == "failed":
            break
        with stack.db.session() as s:
            row = s.get(Task, task_id)
            assert row is not None
            attempt = row.attempts
        if task["status"] == "running" and attempt > killed:
            # Kill the pool child running the task (the worker lives on).
            for proc in stack.procs:
                if proc.name == "worker":
                    for child in psutil.Process(proc.process.pid).children(recursive=True):
                        child.kill()
            killed = attempt
        time.sleep(0.2)
    task = api.get(task_id)
    assert task["status"] == "failed", task
    assert task["error"]["code"] == "worker_lost"
    assert killed == 3
    assert api.http.get(stack.base_url + "/v1/organization").json()["credits"] == 1000


def test_redis_down_at_submission_still_202_and_the_task_completes_later(
    make_stack: Callable[..., Stack], private_redis: EmbeddedRedis
) -> None:
    stack = make_stack(redis_url=private_redis.url)
    stack.web()
    org = stack.org()
    api = Api(stack.base_url, org)
    private_redis.stop()

    started = time.monotonic()
    r = api.submit({"type": "echo", "input": "survives"})
    assert r.status_code == 202, r.text
    assert time.monotonic() - started < 10
    task_id = r.json()["taskId"]
    assert api.get(task_id)["status"] == "queued"

    restarted = EmbeddedRedis(private_redis.data_dir, port=private_redis.port, persist=False).start()
    private_redis.process = restarted.process  # the fixture stops it
    stack.beat()
    stack.worker()
    task = api.wait_status(task_id, {"succeeded", "failed"}, timeout=60)
    assert task["status"] == "succeeded" and task["result"] == "survives"
