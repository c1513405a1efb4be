"""``POST /v1/deliveries/redeliver`` and ``waybill deliveries redeliver``: failed deliveries sent again."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update

from app.cli import since_value
from app.db import Database
from app.models import Task, WebhookDelivery
from app.services import bulk_redelivery
from app.services.task_types import Registry
from app.usecases import run
from tests.conftest import RecordingPublisher
from tests.support import Org, make_org

RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)


@pytest.fixture
def private_ok(app: Any) -> None:
    wb = app.extensions["waybill"]
    wb.settings = wb.settings.with_overrides(webhook_allow_private=True)


def _failed_delivery(client: FlaskClient, db: Database, org: Org, url: str, created: datetime) -> str:
    """A finished task whose result's delivery has failed for good, created at ``created``."""
    task_id = client.post(
        "/v1/tasks", json={"type": "echo", "webhook": {"url": url}}, headers=org.headers
    ).get_json()["taskId"]
    assert run.execute(db, Registry.from_entry_points(), RUN, task_id).status == "succeeded"
    with db.session() as s:
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.task_id == task_id)
            .values(status="failed", attempts=5, next_attempt_at=None, created_at=created)
        )
        s.execute(update(Task).where(Task.id == task_id).values(webhook_status="failed", webhook_attempts=5))
        return str(
            s.execute(select(WebhookDelivery.id).where(WebhookDelivery.task_id == task_id)).scalar_one()
        )


def _delivery(db: Database, delivery_id: str) -> WebhookDelivery:
    with db.session() as s:
        found = s.get(WebhookDelivery, delivery_id)
        assert found is not None
        return found


@pytest.mark.usefixtures("private_ok")
def test_failed_deliveries_since_a_time_to_a_host_are_sent_again_once(
    client: FlaskClient, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    now = datetime.now(UTC)
    old = _failed_delivery(client, db, org, "http://127.0.0.1:9/a", now - timedelta(days=2))
    recent = _failed_delivery(client, db, org, "http://127.0.0.1:9/b", now - timedelta(hours=1))
    other_host = _failed_delivery(client, db, org, "http://localhost:9/c", now - timedelta(hours=1))
    stranger = make_org(db, "stranger")
    theirs = _failed_delivery(client, db, stranger, "http://127.0.0.1:9/d", now - timedelta(hours=1))
    publisher.deliveries.clear()

    since = (now - timedelta(days=1)).isoformat()
    r = client.post(
        "/v1/deliveries/redeliver", json={"since": since, "host": "127.0.0.1"}, headers=org.headers
    )
    assert r.status_code == 202 and r.get_json() == {"count": 1}
    assert [d for d, _ in publisher.deliveries] == [recent]
    moved = _delivery(db, recent)
    assert (moved.status, moved.attempts, moved.max_attempts) == (
        "pending",
        5,
        6,
    )  # one attempt more, same id
    with db.session() as s:
        assert s.get(Task, moved.task_id).webhook_status == "pending"  # type: ignore[union-attr]
    for untouched in (old, other_host, theirs):
        assert _delivery(db, untouched).status == "failed"
    # Again: nothing is failed any more there.
    again = client.post(
        "/v1/deliveries/redeliver", json={"since": since, "host": "127.0.0.1"}, headers=org.headers
    )
    assert again.get_json() == {"count": 0}
    # Any host, case and trailing dot ignored in the filter.
    r = client.post(
        "/v1/deliveries/redeliver", json={"since": since, "host": "LOCALHOST."}, headers=org.headers
    )
    assert r.get_json() == {"count": 1} and _delivery(db, other_host).status == "pending"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "since"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-11-30T08:00:00"}, "since"),  # no offset: which day is it?
        ({"since": "2026-11-30T08:00:00Z", "host": ""}, "host"),
        ({"since": "2026-11-30T08:00:00Z", "hosts": ["a"]}, "hosts"),
    ],
)
def test_a_bad_request_is_400_and_changes_nothing(
    client: FlaskClient, org: Org, body: dict, field: str
) -> None:
    r = client.post("/v1/deliveries/redeliver", json=body, headers=org.headers)
    assert r.status_code == 400 and field in r.get_json()["errors"], r.get_json()


def test_the_per_call_bound_leaves_the_rest_for_the_next_call(
    client: FlaskClient, db: Database, org: Org, monkeypatch: pytest.MonkeyPatch, private_ok: None
) -> None:
    monkeypatch.setattr(bulk_redelivery, "MAX_PER_CALL", 2)
    monkeypatch.setattr(bulk_redelivery, "BATCH", 2)
    now = datetime.now(UTC)
    for i in range(3):
        _failed_delivery(client, db, org, "http://127.0.0.1:9/x", now - timedelta(minutes=10 - i))
    since = {"since": (now - timedelta(hours=1)).isoformat()}
    counts = [
        client.post("/v1/deliveries/redeliver", json=since, headers=org.headers).get_json()["count"]
        for _ in range(3)
    ]
    assert counts == [2, 1, 0]


def test_since_on_the_command_line() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert since_value("2h", now) == now - timedelta(hours=2)
    assert since_value("7d", now) == now - timedelta(days=7)
    assert since_value("2026-11-30T08:00:00Z") == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    for bad in ("2026-11-30T08:00:00", "yesterday", "2w", "-3h"):
        with pytest.raises(argparse.ArgumentTypeError):
            since_value(bad, now)
