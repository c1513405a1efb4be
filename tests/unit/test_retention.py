"""Result retention: expired tasks answer 404 and are deleted in batches, nothing else is."""

from __future__ import annotations

from datetime import timedelta

from flask.testing import FlaskClient
from sqlalchemy import func, select

from app.db import Database
from app.models import CreditEntry, Task, WebhookAttempt, WebhookDelivery
from app.models.base import utcnow
from app.services import deliveries, retention, submission
from app.services.deliveries import AttemptOutcome
from app.services.task_types import Registry
from app.usecases import run
from tests.support import Org

REG = Registry.from_entry_points()
RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False, retention_days=30)


def _finished(db: Database, org: Org, webhook: bool = False) -> str:
    with db.session() as s:
        task_id = submission.submit(
            s,
            org.id,
            submission.SubmitRequest(type="echo", webhook_url="https://h.example/" if webhook else None),
            registry=REG,
        ).task.id
    outcome = run.execute(db, REG, RUN, task_id)
    if outcome.delivery_id:
        with db.session() as s:
            plan = deliveries.claim_attempt(s, outcome.delivery_id, hold_seconds=30)
        assert plan is not None
        with db.session() as s:
            deliveries.record_attempt(
                s, plan, AttemptOutcome("delivered", 200, 3, None), retry_base_seconds=1
            )
    return task_id


def _count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(model)).scalar_one())


def test_expires_at_is_shown_and_an_expired_task_is_404(client: FlaskClient, db: Database, org: Org) -> None:
    task_id = _finished(db, org)
    body = client.get(f"/v1/tasks/{task_id}", headers=org.headers).get_json()
    assert body["expiresAt"] and body["expiresAt"] > body["completedAt"]
    with db.session() as s:
        t = s.get(Task, task_id)
        assert t is not None
        t.expires_at = utcnow() - timedelta(seconds=1)
    assert client.get(f"/v1/tasks/{task_id}", headers=org.headers).status_code == 404
    assert client.get("/v1/tasks", headers=org.headers).get_json()["data"] == []


def test_a_waiting_task_does_not_expire(client: FlaskClient, org: Org) -> None:
    r = client.post("/v1/tasks", json={"type": "echo"}, headers=org.headers)
    assert r.get_json()["expiresAt"] is None


def test_retention_deletes_exactly_the_expired_rows(db: Database, org: Org) -> None:
    old = [_finished(db, org, webhook=True) for _ in range(3)]
    fresh = [_finished(db, org, webhook=True) for _ in range(2)]
    with db.session() as s:
        waiting = submission.submit(s, org.id, submission.SubmitRequest(type="echo"), registry=REG).task.id
    with db.session() as s:
        for task_id in old:
            t = s.get(Task, task_id)
            assert t is not None
            t.expires_at = utcnow() - timedelta(days=1)
    ledger_before = _count(db, CreditEntry)
    assert _count(db, WebhookDelivery) == 5 and _count(db, WebhookAttempt) == 5
    deleted = 0
    while True:
        with db.session() as s:
            n = retention.delete_expired(s, batch=2)
        if not n:
            break
        deleted += n
    assert deleted == 3
    with db.session() as s:
        remaining = set(s.execute(select(Task.id)).scalars())
    assert remaining == {*fresh, waiting}
    assert _count(db, WebhookDelivery) == 2 and _count(db, WebhookAttempt) == 2
    assert _count(db, CreditEntry) == ledger_before  # the ledger keeps its history
