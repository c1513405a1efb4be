"""Progress (stored throttled, latest wins) and a task's events (history, live, resume), in one process."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.api import events as events_api
from app.db import Database
from app.dispatch import keys
from app.models import Task
from app.services import lifecycle, submission
from app.services.task_events import events_of, parse_last_event_id
from app.services.task_types import Registry, TaskContext, TaskType
from app.usecases import run
from app.usecases.progress import ProgressWriter, checked
from tests.support import Org

REGISTRY = Registry.from_entry_points()
RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)


def _submit(db: Database, org: Org, type_: str = "echo", registry: Registry = REGISTRY) -> str:
    with db.session() as s:
        return submission.submit(s, org.id, submission.SubmitRequest(type=type_), registry=registry).task.id


def _task(db: Database, task_id: str) -> Task:
    with db.session() as s:
        task = s.get(Task, task_id)
        assert task is not None
        return task


def _claim(db: Database, task_id: str) -> int:
    with db.session() as s:
        return lifecycle.claim(s, task_id, lease_seconds=30, max_attempts=3).attempt


class Notes:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def __call__(self, task_id: str, what: str) -> None:
        self.sent.append((task_id, what))


@pytest.mark.parametrize(
    ("fraction", "message"),
    [(None, None), (-0.1, None), (1.5, None), (float("nan"), None), (True, None), ("0.5", None), (None, 3)],
)
def test_a_bad_report_is_the_handlers_error(fraction: Any, message: Any) -> None:
    with pytest.raises(ValueError, match="progress"):
        checked(fraction, message)
    # The same without a writer (a handler run outside a worker).
    with pytest.raises(ValueError, match="progress"):
        TaskContext("t", "o", 1, False).progress(fraction, message)


def test_reports_are_coalesced_to_about_one_write_a_second_and_the_latest_wins(
    db: Database, org: Org
) -> None:
    task_id = _submit(db, org)
    attempt = _claim(db, task_id)
    notes = Notes()
    writer = ProgressWriter(db, notes, interval=0.3)
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < 1.0:  # a handler reporting as fast as it can
        n += 1
        writer.report(task_id, attempt, min(n / 10_000, 1.0), f"step {n}")
    took = time.monotonic() - started
    assert n > 1000 and took < 1.2  # reporting never waited on the database
    time.sleep(0.5)
    task = _task(db, task_id)
    # About one write per interval over 1.5 s: a handful, not thousands.
    assert 2 <= task.progress_seq <= 7, task.progress_seq
    assert len(notes.sent) == task.progress_seq and set(notes.sent) == {(task_id, "progress")}
    writer.report(task_id, attempt, 1.0, "last")
    writer.flush(task_id)  # the handler returned: its last report is stored at once
    task = _task(db, task_id)
    assert task.progress["fraction"] == 1.0 and task.progress["message"] == "last"
    assert task.progress["updatedAt"].endswith("Z")


def test_a_report_from_a_run_that_no_longer_holds_the_task_changes_nothing(db: Database, org: Org) -> None:
    task_id = _submit(db, org)
    attempt = _claim(db, task_id)
    with db.session() as s:
        assert lifecycle.record_result(s, task_id, attempt, result={"ok": True})[0]
    notes = Notes()
    writer = ProgressWriter(db, notes)
    writer.report(task_id, attempt, 0.5, None)
    writer.flush(task_id)
    assert _task(db, task_id).progress is None and notes.sent == []


def test_a_handler_reports_through_its_context_and_the_run_stores_the_last_report(
    db: Database, org: Org
) -> None:
    def steps(_input: Any, ctx: TaskContext) -> dict[str, int]:
        for i in range(1, 4):
            ctx.progress(i / 4, f"step {i} of 4")
        return {"steps": 3}

    registry = Registry.from_entry_points()
    registry.add(TaskType(name="steps", cost=1, description="reports", handler=steps))
    task_id = _submit(db, org, "steps", registry)
    writer = ProgressWriter(db, Notes())
    assert run.execute(db, registry, RUN, task_id, progress=writer).status == "succeeded"
    task = _task(db, task_id)
    assert task.progress["fraction"] == 0.75 and task.progress["message"] == "step 3 of 4"
    assert task.progress_seq >= 1


def test_the_history_of_a_task_in_id_order(db: Database, org: Org) -> None:
    task_id = _submit(db, org)
    queued = events_of(_task(db, task_id))
    assert [(e.id, e.event) for e in queued] == [(1, "task.queued")]
    attempt = _claim(db, task_id)
    writer = ProgressWriter(db, Notes())
    for fraction in (0.2, 0.6):
        writer.report(task_id, attempt, fraction, None)
        writer.flush(task_id)
    running = events_of(_task(db, task_id))
    assert [(e.id, e.event) for e in running] == [
        (1, "task.queued"),
        (2, "task.started"),
        (4, "task.progress"),
    ]
    assert running[0].data["status"] == "queued" and running[0].data["startedAt"] is None
    assert running[1].data["status"] == "running" and running[1].data["progress"] is None
    assert running[2].data["progress"]["fraction"] == 0.6
    with db.session() as s:
        lifecycle.record_result(s, task_id, attempt, result={"done": 1})
    done = events_of(_task(db, task_id))
    assert [(e.id, e.event) for e in done][-1] == (5, "task.succeeded")
    assert done[-1].final and done[-1].data["result"] == {"done": 1}
    assert "result" not in done[2].data and done[2].data["completedAt"] is None


def test_a_task_canceled_while_queued_goes_from_queued_to_canceled(db: Database, org: Org) -> None:
    task_id = _submit(db, org)
    with db.session() as s:
        lifecycle.cancel(s, org.id, task_id)
    assert [(e.id, e.event) for e in events_of(_task(db, task_id))] == [
        (1, "task.queued"),
        (3, "task.canceled"),
    ]


@pytest.mark.parametrize(
    ("header", "expected"), [(None, 0), ("3", 3), (" 7 ", 7), ("x", 0), ("-1", 0), ("9" * 20, 0)]
)
def test_last_event_id(header: str | None, expected: int) -> None:
    assert parse_last_event_id(header) == expected


def _frames(body: bytes) -> list[dict[str, Any]]:
    out = []
    for block in body.decode().split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name in ("id", "event", "data"):
                fields[name] = value
        if "event" in fields:
            fields["data"] = json.loads(fields["data"])
            out.append(fields)
    return out


def test_a_finished_tasks_stream_replays_its_history_and_ends(
    client: FlaskClient, db: Database, org: Org
) -> None:
    task_id = _submit(db, org)
    assert run.execute(db, REGISTRY, RUN, task_id).status == "succeeded"
    r = client.get(f"/v1/tasks/{task_id}/events", headers=org.headers)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache"
    frames = _frames(r.get_data())
    assert [(f["id"], f["event"]) for f in frames] == [
        ("1", "task.queued"),
        ("2", "task.started"),
        ("3", "task.succeeded"),
    ]
    assert frames[-1]["data"]["taskId"] == task_id and frames[-1]["data"]["status"] == "succeeded"
    # Resumed after the second event: only the third.
    again = client.get(f"/v1/tasks/{task_id}/events", headers={**org.headers, "Last-Event-ID": "2"})
    assert [f["event"] for f in _frames(again.get_data())] == ["task.succeeded"]


def test_events_of_another_organizations_task_are_404(client: FlaskClient, db: Database, org: Org) -> None:
    from tests.support import make_org

    other = make_org(db)
    task_id = _submit(db, other)
    r = client.get(f"/v1/tasks/{task_id}/events", headers=org.headers)
    assert r.status_code == 404 and r.mimetype == "application/problem+json"


def _chunks(response: Any) -> Iterator[bytes]:
    """An unbuffered test response's body, chunk by chunk, as the server yields it."""
    for chunk in response.response:
        yield bytes(chunk)


@pytest.fixture
def bounded_app(app: Flask) -> Iterator[Flask]:
    wb = app.extensions["waybill"]
    events_api._slots[id(wb)] = events_api.StreamSlots(1)
    yield app
    events_api._slots.pop(id(wb), None)


def test_streams_past_the_bound_answer_503_and_a_closed_stream_gives_its_slot_back(
    bounded_app: Flask, db: Database, org: Org
) -> None:
    client = bounded_app.test_client()
    task_id = _submit(db, org)  # queued: its stream stays open
    first = client.get(f"/v1/tasks/{task_id}/events", headers=org.headers, buffered=False)
    assert first.status_code == 200
    chunks = _chunks(first)
    assert next(chunks).startswith(b"retry:")
    assert b"task.queued" in next(chunks)
    refused = client.get(f"/v1/tasks/{task_id}/events", headers=org.headers)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert refused.get_json()["type"].endswith("too-many-event-streams")
    first.close()  # the client went away
    slots = events_api.slots_of(bounded_app.extensions["waybill"])
    assert slots.open == 0
    second = client.get(f"/v1/tasks/{task_id}/events", headers=org.headers, buffered=False)
    assert second.status_code == 200
    second.close()


def test_a_live_stream_sees_started_progress_and_the_end_as_the_worker_publishes(
    app: Flask, db: Database, org: Org
) -> None:
    wb = app.extensions["waybill"]
    client = app.test_client()
    task_id = _submit(db, org)
    response = client.get(f"/v1/tasks/{task_id}/events", headers=org.headers, buffered=False)
    chunks = _chunks(response)
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.extend(chunks), daemon=True)
    reader.start()

    def publish(what: str) -> None:
        wb.redis.publish(keys.DONE_CHANNEL + task_id, what)

    time.sleep(0.3)
    attempt = _claim(db, task_id)
    publish("running")
    writer = ProgressWriter(db, publish_as(publish))
    writer.report(task_id, attempt, 0.5, "half")
    writer.flush(task_id)
    with db.session() as s:
        lifecycle.record_result(s, task_id, attempt, result={"n": 1})
    publish("succeeded")
    reader.join(10)
    assert not reader.is_alive(), "the stream did not end after the final event"
    frames = _frames(b"".join(seen))
    assert [f["event"] for f in frames] == ["task.queued", "task.started", "task.progress", "task.succeeded"]
    assert [int(f["id"]) for f in frames] == sorted(int(f["id"]) for f in frames)
    assert frames[2]["data"]["progress"]["message"] == "half"


def publish_as(publish: Any) -> Any:
    return lambda _task_id, what: publish(what)
