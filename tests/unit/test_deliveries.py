"""Webhook deliveries at the service level: events, signatures, retries, replay."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from app.db import Database
from app.models import Task, WebhookDelivery
from app.models.base import utcnow
from app.services import deliveries, organizations, submission
from app.services.deliveries import AttemptOutcome
from app.services.errors import NothingToDeliver
from app.services.task_types import Registry
from app.usecases import run
from tests.support import Org

RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)
REG = Registry.from_entry_points()


def _finished_with_webhook(db: Database, org: Org) -> tuple[str, str]:
    with db.session() as s:
        task_id = submission.submit(
            s,
            org.id,
            submission.SubmitRequest(type="echo", input={"v": 1}, webhook_url="https://hooks.example/x"),
            registry=REG,
        ).task.id
    outcome = run.execute(db, REG, RUN, task_id)
    assert outcome.delivery_id is not None
    return task_id, outcome.delivery_id


def test_a_final_task_with_a_webhook_gets_one_pending_delivery(db: Database, org: Org) -> None:
    task_id, delivery_id = _finished_with_webhook(db, org)
    with db.session() as s:
        d = s.get(WebhookDelivery, delivery_id)
        t = s.get(Task, task_id)
        assert d is not None and t is not None
        assert d.status == "pending" and d.event_type == "task.succeeded"
        assert d.payload["type"] == "task.succeeded"
        assert d.payload["data"]["taskId"] == task_id and d.payload["data"]["result"] == {"v": 1}
        assert t.webhook_status == "pending"


def test_signature_verifies_with_the_standard_webhooks_library(db: Database, org: Org) -> None:
    _, delivery_id = _finished_with_webhook(db, org)
    with db.session() as s:
        plan = deliveries.claim_attempt(s, delivery_id, hold_seconds=30)
    assert plan is not None
    ts = int(utcnow().timestamp())
    headers = {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": deliveries.sign(plan.secrets, delivery_id, ts, plan.body),
    }
    payload = Webhook(org.webhook_secret).verify(plan.body, headers)
    assert payload["data"]["status"] == "succeeded"


def test_rotation_signs_with_both_secrets_for_the_overlap(db: Database, org: Org) -> None:
    with db.session() as s:
        new = organizations.rotate_webhook_secret(s, org.id)
    _, delivery_id = _finished_with_webhook(db, org)
    with db.session() as s:
        plan = deliveries.claim_attempt(s, delivery_id, hold_seconds=30)
    assert plan is not None and plan.secrets == [new, org.webhook_secret]
    ts = int(utcnow().timestamp())
    sig = deliveries.sign(plan.secrets, delivery_id, ts, plan.body)
    assert len(sig.split(" ")) == 2
    headers = {"webhook-id": delivery_id, "webhook-timestamp": str(ts), "webhook-signature": sig}
    for secret in (new, org.webhook_secret):
        Webhook(secret).verify(plan.body, headers)
    # After the 24-hour overlap only the new secret signs.
    with db.session() as s:
        later = deliveries.claim_attempt(s, delivery_id, hold_seconds=30, now=utcnow() + timedelta(hours=25))
    assert later is not None and later.secrets == [new]


def _attempt(db: Database, delivery_id: str, outcome: str, status: int | None, at) -> float | None:
    with db.session() as s:
        plan = deliveries.claim_attempt(s, delivery_id, hold_seconds=30, now=at)
    assert plan is not None
    with db.session() as s:
        return deliveries.record_attempt(
            s,
            plan,
            AttemptOutcome(outcome, status, 5, None if outcome == "delivered" else outcome),
            retry_base_seconds=120,
            now=at,
        )


def test_retries_double_then_fail_after_five_attempts(db: Database, org: Org) -> None:
    task_id, delivery_id = _finished_with_webhook(db, org)
    at = utcnow()
    countdowns = []
    for _ in range(5):
        countdowns.append(_attempt(db, delivery_id, "http_error", 500, at))
        if countdowns[-1] is not None:
            # An early copy of the message is ignored until the attempt is due.
            with db.session() as s:
                assert deliveries.claim_attempt(s, delivery_id, hold_seconds=30, now=at) is None
            at += timedelta(seconds=countdowns[-1])
    assert countdowns[-1] is None
    for got, want in zip(countdowns[:4], [120, 240, 480, 960], strict=True):
        assert got is not None and want * 0.94 <= got <= want * 1.06
    with db.session() as s:
        d = s.get(WebhookDelivery, delivery_id)
        t = s.get(Task, task_id)
        assert d is not None and t is not None
        assert d.status == "failed" and d.attempts == 5
        assert t.status == "succeeded" and t.webhook_status == "failed" and t.webhook_attempts == 5
        listed = deliveries.list_for_task(s, task_id)
    assert [a["attempt"] for a in listed[0]["attempts"]] == [1, 2, 3, 4, 5]
    assert all(a["responseStatus"] == 500 for a in listed[0]["attempts"])


def test_410_ends_retries_at_once(db: Database, org: Org) -> None:
    _, delivery_id = _finished_with_webhook(db, org)
    assert _attempt(db, delivery_id, "gone", 410, utcnow()) is None
    with db.session() as s:
        d = s.get(WebhookDelivery, delivery_id)
        assert d is not None and d.status == "failed" and d.attempts == 1


def test_delivered_once_and_replay_keeps_the_webhook_id(db: Database, org: Org) -> None:
    task_id, delivery_id = _finished_with_webhook(db, org)
    assert _attempt(db, delivery_id, "delivered", 200, utcnow()) is None
    with db.session() as s:
        assert deliveries.claim_attempt(s, delivery_id, hold_seconds=30) is None  # nothing left to send
        task = s.get(Task, task_id)
        assert task is not None
        assert deliveries.redeliver(s, task) == [delivery_id]
    assert _attempt(db, delivery_id, "http_error", 503, utcnow()) is None  # one attempt, no retries
    with db.session() as s:
        d = s.get(WebhookDelivery, delivery_id)
        assert d is not None and d.attempts == 2 and d.status == "failed"


def test_concurrent_copies_claim_an_attempt_once(db: Database, org: Org) -> None:
    _, delivery_id = _finished_with_webhook(db, org)
    with db.session() as s:
        assert deliveries.claim_attempt(s, delivery_id, hold_seconds=30) is not None
    with db.session() as s:
        assert deliveries.claim_attempt(s, delivery_id, hold_seconds=30) is None


def test_redeliver_before_any_event_is_409(db: Database, org: Org) -> None:
    with db.session() as s:
        task = submission.submit(
            s, org.id, submission.SubmitRequest(type="echo", webhook_url="https://h.example/"), registry=REG
        ).task
    with db.session() as s, pytest.raises(NothingToDeliver):
        t = s.get(Task, task.id)
        assert t is not None
        deliveries.redeliver(s, t)


def test_body_is_the_json_payload(db: Database, org: Org) -> None:
    _, delivery_id = _finished_with_webhook(db, org)
    with db.session() as s:
        plan = deliveries.claim_attempt(s, delivery_id, hold_seconds=40)
        d = s.execute(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)).scalar_one()
        assert plan is not None and json.loads(plan.body) == d.payload
        assert plan.body == deliveries.body_of(d.payload)
        assert b'": ' not in plan.body and b'", ' not in plan.body  # compact: the bytes that are signed


def test_a_name_rebound_to_loopback_at_delivery_is_refused_without_a_connection(
    db: Database, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    canary = socket.socket()
    canary.bind(("127.0.0.1", 0))
    canary.listen(1)
    canary.settimeout(0.3)
    port = canary.getsockname()[1]
    answer = {"ip": "93.184.215.14"}  # public at submission time
    real = socket.getaddrinfo

    def dns(host, *args, **kwargs):
        if host == "hooks.rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer["ip"], port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    url = f"http://hooks.rebind.example:{port}/hook"
    from app.services import outbound

    outbound.check_url(url, allow_private=False)  # accepted at submission
    with db.session() as s:
        task_id = submission.submit(
            s, org.id, submission.SubmitRequest(type="echo", webhook_url=url), registry=REG
        ).task.id
    delivery_id = run.execute(db, REG, RUN, task_id).delivery_id
    assert delivery_id is not None
    answer["ip"] = "127.0.0.1"  # the attacker's DNS now answers loopback
    with db.session() as s:
        plan = deliveries.claim_attempt(s, delivery_id, hold_seconds=30)
    assert plan is not None
    result = deliveries.send_attempt(plan, timeout=1, allow_private=False)
    assert result.outcome == "refused" and result.response_status is None
    with pytest.raises(TimeoutError):
        canary.accept()
    canary.close()
