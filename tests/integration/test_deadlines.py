"""Deadlines (``cancelAfter``) on real processes: web, a tasks worker, the webhooks worker and beat.

The stack's beat runs the sweep every second (``SWEEP_INTERVAL_SECONDS=1``),
so a deadline fires within about a second of passing, plus the time the
sweep's message takes to reach the maintenance worker.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import psutil
import pytest

from tests.support import Api, Receiver, Stack, wait_for

pytestmark = pytest.mark.integration

# How late a deadline may fire here: the sweep interval (1 s), the beat and
# worker hops, and headroom for a loaded CI machine.
LATENESS = timedelta(seconds=6)


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _late_by(task: dict) -> timedelta:
    """How long after its deadline the task was canceled."""
    return _at(task["completedAt"]) - (_at(task["createdAt"]) + timedelta(seconds=task["cancelAfter"]))


def test_deadlines_cancel_running_and_waiting_tasks_and_spare_finished_ones(
    make_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    stack = make_stack()
    stack.web()
    worker = stack.worker(queues="tasks", concurrency=3)
    pool = set(psutil.Process(worker.pid).children())
    stack.webhooks_worker()  # runs beat's sweep (the maintenance queue), as the Procfile does
    stack.beat()
    hook = receiver.url + "/hook"
    one_slot = Api(stack.base_url, stack.org("one-slot", concurrency_limit=1, credits=10))
    other = Api(stack.base_url, stack.org("other", credits=10))

    # A 30 s run with 2 s to live.
    running = other.submit(
        {"type": "sleep", "input": {"seconds": 30}, "cancelAfter": 2, "webhook": {"url": hook}}
    ).json()["taskId"]
    # A task that waits behind a concurrency limit of 1 until its deadline passes (header form).
    blocker = one_slot.submit({"type": "sleep", "input": {"seconds": 6}}).json()["taskId"]
    one_slot.wait_status(blocker, {"running"}, timeout=30)
    waiting = one_slot.submit(
        {"type": "echo", "input": 1, "webhook": {"url": hook}}, **{"Cancel-After": "2s"}
    )
    assert waiting.status_code == 202, waiting.text
    assert waiting.json()["cancelAfter"] == 2
    waiting_id = waiting.json()["taskId"]
    # One that finishes well before its deadline.
    quick = other.submit({"type": "echo", "input": 2, "cancelAfter": 60, "webhook": {"url": hook}}).json()[
        "taskId"
    ]

    final = {"succeeded", "failed", "canceled"}
    for api, task_id in ((other, running), (one_slot, waiting_id)):
        task = api.wait_status(task_id, final, timeout=30)
        assert task["status"] == "canceled", task
        assert task["error"]["code"] == "deadline_exceeded", task
        assert "cancelAfter of 2 s" in task["error"]["message"]
        assert "result" not in task
        assert timedelta(0) <= _late_by(task) < LATENESS, task
    assert other.get(running)["startedAt"] is not None  # it was canceled while running
    assert one_slot.get(waiting_id)["startedAt"] is None  # and this one never started

    quick_task = other.wait_status(quick, final, timeout=30)
    assert quick_task["status"] == "succeeded" and quick_task["result"] == 2
    assert "error" not in quick_task

    def run_ended() -> bool:
        # The deadline's revoke SIGTERMs the pool process running the sleep (the
        # pool starts another in its place); had the revoke been lost, the run
        # would end after its 30 s, its outcome discarded and logged.
        replaced = bool(pool - set(psutil.Process(worker.pid).children()))
        logged = any(
            r.get("task_id") == running and r.get("event") in ("task.finished", "task.discarded")
            for r in worker.log_records()
        )
        return replaced or logged

    wait_for(run_ended, 20, "the expired task's run to end")

    # Each event once, the deadline's with its error code.
    wait_for(lambda: len(receiver.events()) >= 3, 30, "the three webhooks")
    by_task = {e["data"]["taskId"]: e for e in receiver.events()}
    assert len(receiver.events()) == len(by_task) == 3
    for task_id in (running, waiting_id):
        assert by_task[task_id]["type"] == "task.canceled"
        assert by_task[task_id]["data"]["error"]["code"] == "deadline_exceeded"
    assert by_task[quick]["type"] == "task.succeeded"

    # The blocker, which has no deadline, runs to its end; the refunds are exact.
    assert one_slot.wait_status(blocker, final, timeout=30)["status"] == "succeeded"
    for api in (one_slot, other):
        org = api.http.get(stack.base_url + "/v1/organization").json()
        assert (org["credits"], org["queued"], org["running"]) == (9, 0, 0), org
    assert other.get(running)["status"] == "canceled"  # the revoked run recorded nothing
