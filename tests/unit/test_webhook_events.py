"""``webhook.events``: which events a task's webhook receives, each its own delivery on the usual path."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from app.db import Database
from app.models import Task, WebhookDelivery
from app.services import deliveries, lifecycle
from app.services.task_types import Registry, TaskContext, TaskType
from app.usecases import run
from app.usecases.progress import ProgressWriter
from tests.conftest import RecordingPublisher
from tests.support import Org

HOOK = "http://127.0.0.1:9/hook"  # literal loopback: no DNS; nothing is ever sent in these tests
RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)


def _submit(client: FlaskClient, org: Org, body: dict[str, Any]) -> Any:
    return client.post("/v1/tasks", json=body, headers=org.headers)


@pytest.fixture
def private_ok(app: Any) -> None:
    wb = app.extensions["waybill"]
    wb.settings = wb.settings.with_overrides(webhook_allow_private=True)


@pytest.mark.parametrize(
    ("events", "field"),
    [
        ([], "webhook.events"),
        (["task.done"], "webhook.events.0"),
        (["task.started", 3], "webhook.events.1"),
        ("task.started", "webhook.events"),
    ],
)
@pytest.mark.usefixtures("private_ok")
def test_a_bad_choice_is_400_naming_it(client: FlaskClient, org: Org, events: Any, field: str) -> None:
    r = _submit(client, org, {"type": "echo", "webhook": {"url": HOOK, "events": events}})
    assert r.status_code == 400, r.get_data(as_text=True)
    assert field in r.get_json()["errors"]


@pytest.mark.usefixtures("private_ok")
def test_the_choice_is_stored_normalized_and_shown(client: FlaskClient, org: Org) -> None:
    chosen = ["task.succeeded", "task.started", "task.started"]
    task = _submit(client, org, {"type": "echo", "webhook": {"url": HOOK, "events": chosen}}).get_json()
    assert task["webhook"]["events"] == ["task.started", "task.succeeded"]
    default = _submit(client, org, {"type": "echo", "webhook": {"url": HOOK}}).get_json()
    assert default["webhook"]["events"] == ["task.succeeded", "task.failed", "task.canceled"]


@pytest.mark.usefixtures("private_ok")
def test_the_choice_is_part_of_the_request_for_an_idempotency_key(client: FlaskClient, org: Org) -> None:
    body = {"type": "echo", "idempotencyKey": "k1", "webhook": {"url": HOOK, "events": ["task.failed"]}}
    assert _submit(client, org, body).status_code == 202
    same = {**body, "webhook": {"url": HOOK, "events": ["task.failed", "task.failed"]}}
    assert _submit(client, org, same).status_code == 200  # the same choice, written differently
    other = {**body, "webhook": {"url": HOOK, "events": ["task.succeeded"]}}
    assert _submit(client, org, other).status_code == 422


def _rows(db: Database, task_id: str) -> list[WebhookDelivery]:
    with db.session() as s:
        return list(
            s.execute(
                select(WebhookDelivery)
                .where(WebhookDelivery.task_id == task_id)
                .order_by(WebhookDelivery.created_at, WebhookDelivery.seq)
            ).scalars()
        )


def _task(db: Database, task_id: str) -> Task:
    with db.session() as s:
        task = s.get(Task, task_id)
        assert task is not None
        return task


def steps(_input: Any, ctx: TaskContext) -> dict[str, int]:
    ctx.progress(0.5, "half")
    return {"ok": 1}


@pytest.mark.usefixtures("private_ok")
def test_started_progress_and_the_result_each_get_a_delivery_and_the_summary_follows_the_result(
    client: FlaskClient, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    registry = Registry.from_entry_points()
    registry.add(TaskType(name="steps", cost=1, description="reports once", handler=steps))
    app_wb = client.application.extensions["waybill"]
    app_wb.registry = registry
    events = ["task.started", "task.progress", "task.succeeded"]
    task_id = _submit(client, org, {"type": "steps", "webhook": {"url": HOOK, "events": events}}).get_json()[
        "taskId"
    ]
    writer = ProgressWriter(db, lambda *_: None, deliver=lambda _id: None)
    assert run.execute(db, registry, RUN, task_id, app_wb.dispatch, progress=writer).status == "succeeded"
    rows = _rows(db, task_id)
    assert [(r.event_type, r.seq) for r in rows] == [
        ("task.started", 0),
        ("task.progress", 1),
        ("task.succeeded", 0),
    ]
    assert len({r.id for r in rows}) == 3  # each its own webhook-id
    assert rows[0].payload["data"]["status"] == "running"
    assert rows[1].payload["data"]["progress"]["message"] == "half"
    assert rows[2].payload["data"]["result"] == {"ok": 1}
    # The started event was handed to the webhooks queue after the claim's commit.
    assert rows[0].id in [d for d, _ in publisher.deliveries]
    listed = client.get(f"/v1/tasks/{task_id}/deliveries", headers=org.headers).get_json()["data"]
    assert [d["event"] for d in listed] == ["task.started", "task.progress", "task.succeeded"]

    # The progress delivery failing for good leaves the task's summary to the result's delivery.
    with db.session() as s:
        plan = deliveries.claim_attempt(s, rows[1].id, hold_seconds=40)
    assert plan is not None
    with db.session() as s:
        deliveries.record_attempt(
            s, plan, deliveries.AttemptOutcome("gone", 410, 3, None), retry_base_seconds=1
        )
    task = _task(db, task_id)
    assert (task.webhook_status, task.webhook_attempts) == ("pending", 0)


@pytest.mark.usefixtures("private_ok")
def test_a_final_event_left_out_sends_nothing(client: FlaskClient, db: Database, org: Org) -> None:
    body = {"type": "http.fetch", "input": {"url": "http://127.0.0.1:9/"}}
    task_id = _submit(
        client, org, {**body, "webhook": {"url": HOOK, "events": ["task.succeeded"]}}
    ).get_json()["taskId"]
    # Loopback is refused to the task (allow_private_targets=False): it fails.
    assert run.execute(db, Registry.from_entry_points(), RUN, task_id).status == "failed"
    assert _rows(db, task_id) == []
    shown = client.get(f"/v1/tasks/{task_id}", headers=org.headers).get_json()
    assert shown["webhook"]["status"] == "none"
    # Canceled, with only task.canceled asked for: that one is sent.
    other = _submit(
        client, org, {"type": "echo", "webhook": {"url": HOOK, "events": ["task.canceled"]}}
    ).get_json()["taskId"]
    with db.session() as s:
        lifecycle.cancel(s, org.id, other)
    assert [r.event_type for r in _rows(db, other)] == ["task.canceled"]


@pytest.mark.usefixtures("private_ok")
def test_a_taken_over_run_sends_no_second_started_event(client: FlaskClient, db: Database, org: Org) -> None:
    from datetime import timedelta

    from app.models.base import utcnow

    task_id = _submit(
        client, org, {"type": "echo", "webhook": {"url": HOOK, "events": ["task.started"]}}
    ).get_json()["taskId"]
    now = utcnow()
    with db.session() as s:
        first = lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now)
    with db.session() as s:  # its worker died: the lease expired, another run takes over
        second = lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now + timedelta(seconds=10))
    assert first.delivery_id is not None and second.task is not None and second.delivery_id is None
    assert [r.event_type for r in _rows(db, task_id)] == ["task.started"]
