"""Deadlines (``cancelAfter`` / ``Cancel-After``): parsing, the sweep's expiry, the claim's, and races.

Through Flask's test client on fakeredis and the test database (SQLite, or
PostgreSQL with ``DATABASE_URL``). The real processes are in
``tests/integration/test_deadlines.py``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import timedelta
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, func, select, update

from app.container import Waybill
from app.db import Database
from app.dispatch import keys
from app.models import CreditEntry, Task, TaskStatus, WebhookDelivery
from app.models.base import utcnow
from app.services import lifecycle, submission
from app.services import sweep as sweep_service
from app.services.task_types import Registry
from app.usecases import deadlines, run, sweep
from tests.conftest import RecordingPublisher
from tests.support import Org, make_org
from tests.support.orgs import ledger_sum
from tests.support.orgs import organization as org_row
from tests.unit.test_api import assert_problem, submit
from tests.unit.test_batch import entries, post_batch, statuses

HOOK = "https://93.184.215.14/hook"  # a literal public address: no DNS at submission
RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)
REGISTRY = Registry.from_entry_points()


def waybill(app: Flask) -> Waybill:
    wb: Waybill = app.extensions["waybill"]
    return wb


def stored(db: Database, task_id: str) -> Task:
    with db.read_session() as s:
        task = s.get(Task, task_id)
        assert task is not None
        s.expunge(task)
        return task


def refunds(db: Database, task_id: str) -> int:
    with db.read_session() as s:
        return int(
            s.execute(
                select(func.count()).where(CreditEntry.task_id == task_id, CreditEntry.kind == "refund")
            ).scalar_one()
        )


def events(db: Database, task_id: str) -> list[tuple[str, Any]]:
    """The task's webhook deliveries: (event type, payload)."""
    with db.read_session() as s:
        rows = s.execute(
            select(WebhookDelivery.event_type, WebhookDelivery.payload)
            .where(WebhookDelivery.task_id == task_id)
            .order_by(WebhookDelivery.created_at)
        ).all()
    return [(e, p) for e, p in rows]


def counters(db: Database, org: Org) -> tuple[int, int, int]:
    row = org_row(db, org.id)
    return row.credits, row.queued, row.running


def credits_of(client: FlaskClient, org: Org) -> int:
    credits: int = client.get("/v1/organization", headers=org.headers).get_json()["credits"]
    return credits


def in_dispatch(redis_client: fakeredis.FakeRedis, org: Org, task_id: str) -> bool:
    """The task waits in its organization's list or holds a slot in Redis."""
    waiting = redis_client.lrange(keys.waiting_key(org.id), 0, -1)
    return task_id.encode() in waiting or redis_client.zscore(keys.LEASES, task_id) is not None


def make_due(db: Database, task_id: str, seconds_ago: float = 1.0) -> None:
    """Move a task's deadline into the past: a unit test does not sleep through cancelAfter."""
    with db.session() as s:
        s.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(deadline_at=utcnow() - timedelta(seconds=seconds_ago))
        )


# -- the field and the header ------------------------------------------------------------


def test_the_field_is_stored_with_its_deadline_and_shown(client: FlaskClient, db: Database, org: Org) -> None:
    task = submit(client, org, {"type": "echo", "cancelAfter": 300}).get_json()
    assert task["cancelAfter"] == 300
    row = stored(db, task["taskId"])
    assert row.cancel_after == 300
    assert row.deadline_at is not None
    assert row.deadline_at - row.created_at == timedelta(seconds=300)
    plain = submit(client, org, {"type": "echo"}).get_json()
    assert plain["cancelAfter"] is None
    assert stored(db, plain["taskId"]).deadline_at is None


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("1h30m", 5400),
        ("7d", 604800),
        ("1d12h", 129600),
        (" 2h ", 7200),
    ],
)
def test_the_header_takes_seconds_or_a_duration(
    client: FlaskClient, db: Database, org: Org, header: str, seconds: int
) -> None:
    r = submit(client, org, {"type": "echo"}, **{"Cancel-After": header})
    assert r.status_code == 202, r.get_data(as_text=True)
    assert r.get_json()["cancelAfter"] == seconds
    row = stored(db, r.get_json()["taskId"])
    assert row.deadline_at is not None and row.deadline_at - row.created_at == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "header", ["0", "0s", "8d", "604801", "1.5h", "15M", "-5", "abc", "1m30", "30s1m", "\uff11\uff12"]
)
def test_a_bad_header_is_400_naming_it(client: FlaskClient, org: Org, header: str) -> None:
    problem = assert_problem(submit(client, org, {"type": "echo"}, **{"Cancel-After": header}), 400)
    assert list(problem["errors"]) == ["Cancel-After"]
    assert credits_of(client, org) == 1000  # nothing was charged


@pytest.mark.parametrize("value", [0, 604801, -1, "90", 1.5, True, {"s": 1}])
def test_a_bad_field_is_400_naming_it(client: FlaskClient, org: Org, value: Any) -> None:
    problem = assert_problem(submit(client, org, {"type": "echo", "cancelAfter": value}), 400)
    assert list(problem["errors"]) == ["cancelAfter"]
    assert credits_of(client, org) == 1000  # nothing was charged


def test_field_and_header_must_agree(client: FlaskClient, org: Org) -> None:
    both = submit(client, org, {"type": "echo", "cancelAfter": 60}, **{"Cancel-After": "2m"})
    problem = assert_problem(both, 400)
    assert list(problem["errors"]) == ["cancelAfter"]
    assert "Cancel-After" in problem["detail"]
    # The same deadline spelled two ways is no conflict.
    same = submit(client, org, {"type": "echo", "cancelAfter": 120}, **{"Cancel-After": "2m"})
    assert same.status_code == 202 and same.get_json()["cancelAfter"] == 120


def test_cancel_after_is_part_of_the_idempotent_request(client: FlaskClient, org: Org) -> None:
    first = submit(client, org, {"type": "echo", "idempotencyKey": "k", "cancelAfter": 120})
    assert first.status_code == 202
    # The header spelling of the same deadline: the same request.
    again = submit(client, org, {"type": "echo", "idempotencyKey": "k"}, **{"Cancel-After": "2m"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["taskId"] == first.get_json()["taskId"]
    for body in ({"cancelAfter": 121}, {}):
        problem = assert_problem(submit(client, org, {"type": "echo", "idempotencyKey": "k", **body}), 422)
        assert problem["idempotencyKey"] == "k"
    plain = submit(client, org, {"type": "echo", "idempotencyKey": "plain"})
    assert plain.status_code == 202
    assert_problem(submit(client, org, {"type": "echo", "idempotencyKey": "plain", "cancelAfter": 5}), 422)


def test_a_request_without_cancel_after_keeps_the_hash_it_had_before() -> None:
    """Tasks stored before cancelAfter existed are still replayed by the same request, not 422."""
    req = submission.SubmitRequest(type="echo", input={"a": 1}, webhook_url=HOOK, metadata={"m": 1})
    before = json.dumps(["echo", {"a": 1}, HOOK, {"m": 1}], sort_keys=True, separators=(",", ":"))
    assert req.fingerprint() == hashlib.sha256(before.encode()).hexdigest()
    with_deadline = submission.SubmitRequest(
        type="echo", input={"a": 1}, webhook_url=HOOK, metadata={"m": 1}, cancel_after=5
    )
    assert with_deadline.fingerprint() != req.fingerprint()


def test_batch_items_carry_their_own_cancel_after(client: FlaskClient, org: Org) -> None:
    data = entries(
        client,
        org,
        [{"type": "echo", "cancelAfter": 60}, {"type": "echo", "cancelAfter": 0}, {"type": "echo"}],
    )
    assert statuses(data) == [202, 400, 202]
    assert data[0]["task"]["cancelAfter"] == 60
    assert list(data[1]["problem"]["errors"]) == ["cancelAfter"]
    assert data[2]["task"]["cancelAfter"] is None


def test_the_header_applies_to_every_item_of_a_batch(client: FlaskClient, org: Org) -> None:
    items = [{"type": "echo"}, {"type": "echo", "cancelAfter": 900}, {"type": "echo", "cancelAfter": 5}]
    data = entries(client, org, items, **{"Cancel-After": "15m"})
    assert statuses(data) == [202, 202, 400]  # the third differs from the header, as alone
    assert [e["task"]["cancelAfter"] for e in data[:2]] == [900, 900]
    assert list(data[2]["problem"]["errors"]) == ["cancelAfter"]
    problem = assert_problem(post_batch(client, org, [{"type": "echo"}], **{"Cancel-After": "soon"}), 400)
    assert list(problem["errors"]) == ["Cancel-After"]


# -- expiry by the sweep -----------------------------------------------------------------


def test_a_queued_task_past_its_deadline_is_canceled_refunded_and_announced(
    app: Flask,
    client: FlaskClient,
    db: Database,
    publisher: RecordingPublisher,
    fake_redis: fakeredis.FakeRedis,
) -> None:
    wb = waybill(app)
    org = make_org(db, "one-slot", concurrency_limit=1)  # the task waits behind another
    blocker = submit(client, org, {"type": "echo"}).get_json()["taskId"]
    task = submit(client, org, {"type": "echo", "cancelAfter": 5, "webhook": {"url": HOOK}}).get_json()
    task_id = task["taskId"]
    assert publisher.tasks == [blocker]
    assert in_dispatch(fake_redis, org, task_id)
    assert counters(db, org) == (998, 2, 0)
    # Not due yet: nothing happens.
    assert deadlines.expire_overdue(wb) == 0
    assert stored(db, task_id).status == "queued"

    pubsub = fake_redis.pubsub()
    pubsub.subscribe(keys.DONE_CHANNEL + task_id)  # a Prefer: wait request holding for it
    assert deadlines.expire_overdue(wb, now=utcnow() + timedelta(seconds=6)) == 1
    row = stored(db, task_id)
    assert row.status == "canceled" and row.error_code == "deadline_exceeded"
    assert row.error_message == "The task was not finished within its cancelAfter of 5 s."
    assert row.completed_at is not None and row.refunded is True
    assert counters(db, org) == (999, 1, 0) and ledger_sum(db, org.id) == 999
    assert refunds(db, task_id) == 1
    assert not in_dispatch(fake_redis, org, task_id)
    assert publisher.revoked == []  # it never ran
    polled = client.get(f"/v1/tasks/{task_id}", headers=org.headers).get_json()
    assert polled["status"] == "canceled"
    assert polled["error"] == {"code": "deadline_exceeded", "message": row.error_message}
    [(event, payload)] = events(db, task_id)
    assert event == "task.canceled"
    assert payload["data"]["error"]["code"] == "deadline_exceeded"
    assert payload["data"]["status"] == "canceled"
    assert polled["webhook"]["status"] == "pending"
    with db.read_session() as s:
        delivery_id = s.execute(
            select(WebhookDelivery.id).where(WebhookDelivery.task_id == task_id)
        ).scalar_one()
    assert (delivery_id, None) in publisher.deliveries
    woken = [pubsub.get_message(timeout=1.0) for _ in range(2)]
    assert {"type": "message", "data": b"canceled"} in [
        {"type": m["type"], "data": m["data"]} for m in woken if m
    ]
    # Again: it is final, nothing moves.
    assert deadlines.expire_overdue(wb, now=utcnow() + timedelta(seconds=60)) == 0
    assert counters(db, org) == (999, 1, 0) and refunds(db, task_id) == 1
    assert len(events(db, task_id)) == 1
    assert stored(db, blocker).status == "queued"  # no deadline: untouched


def test_a_running_task_past_its_deadline_is_canceled_and_revoked(
    app: Flask, client: FlaskClient, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    wb = waybill(app)
    task_id = submit(client, org, {"type": "echo", "cancelAfter": 2, "webhook": {"url": HOOK}}).get_json()[
        "taskId"
    ]
    with db.session() as s:
        claim = lifecycle.claim(s, task_id, lease_seconds=30, max_attempts=3)
    assert claim.task is not None and counters(db, org) == (999, 0, 1)
    assert deadlines.expire_overdue(wb, now=utcnow() + timedelta(seconds=3)) == 1
    row = stored(db, task_id)
    assert row.status == "canceled" and row.error_code == "deadline_exceeded"
    assert row.lease_expires_at is None
    assert counters(db, org) == (1000, 0, 0) and ledger_sum(db, org.id) == 1000
    assert refunds(db, task_id) == 1
    assert publisher.revoked == [task_id]
    assert [e for e, _ in events(db, task_id)] == ["task.canceled"]
    # The run, not stopped in time, records late: its outcome is discarded.
    with db.session() as s:
        assert lifecycle.record_result(s, task_id, claim.attempt, result={"late": True}) == (False, None)
    row = stored(db, task_id)
    assert row.status == "canceled" and row.result is None
    assert counters(db, org) == (1000, 0, 0) and refunds(db, task_id) == 1


def test_a_result_recorded_first_leaves_the_deadline_nothing_to_do(
    app: Flask, client: FlaskClient, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    wb = waybill(app)
    task_id = submit(client, org, {"type": "echo", "cancelAfter": 2, "webhook": {"url": HOOK}}).get_json()[
        "taskId"
    ]
    with db.session() as s:
        claim = lifecycle.claim(s, task_id, lease_seconds=30, max_attempts=3)
    # The sweep has read the task as due, then the run records before the expiry's transaction.
    with db.read_session() as s:
        due = sweep_service.overdue(s, TaskStatus.RUNNING, now=utcnow() + timedelta(seconds=3))
    assert due == [task_id]
    with db.session() as s:
        assert lifecycle.record_result(s, task_id, claim.attempt, result={"ok": 1})[0]
    assert deadlines.expire(wb, task_id, now=utcnow() + timedelta(seconds=3)) is False
    row = stored(db, task_id)
    assert row.status == "succeeded" and row.result == {"ok": 1} and row.error_code is None
    assert counters(db, org) == (999, 0, 0) and refunds(db, task_id) == 0
    assert [e for e, _ in events(db, task_id)] == ["task.succeeded"]
    assert publisher.revoked == []


def _end(
    db: Database, task_id: str, how: str, barrier: threading.Barrier, outcomes: list[tuple[str, bool]]
) -> None:
    barrier.wait()
    with db.session() as s:
        if how == "deadline":
            done = lifecycle.expire(s, task_id, now=utcnow() + timedelta(seconds=5)).done
        elif how == "cancel":
            done = lifecycle.finish(s, task_id, TaskStatus.CANCELED, error=("canceled", "raced")).done
        else:
            done = lifecycle.record_result(s, task_id, 1, result={"won": True})[0]
    outcomes.append((how, done))


def test_racing_deadline_cancel_and_result_end_the_task_one_way(db: Database, org: Org) -> None:
    for _ in range(8):
        with db.session() as s:
            task_id = submission.submit(
                s,
                org.id,
                submission.SubmitRequest(type="echo", webhook_url=HOOK, cancel_after=1),
                registry=REGISTRY,
            ).task.id
        with db.session() as s:
            assert lifecycle.claim(s, task_id, lease_seconds=30, max_attempts=3).attempt == 1
        barrier = threading.Barrier(3)
        outcomes: list[tuple[str, bool]] = []
        threads = [
            threading.Thread(target=_end, args=(db, task_id, how, barrier, outcomes))
            for how in ("deadline", "cancel", "record")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [how for how, done in outcomes if done]
        assert len(outcomes) == 3 and len(winners) == 1, outcomes
        row = stored(db, task_id)
        expected = {"deadline": ("canceled", "deadline_exceeded"), "cancel": ("canceled", "canceled")}
        assert (row.status, row.error_code) == expected.get(winners[0], ("succeeded", None))
        assert refunds(db, task_id) == (0 if winners[0] == "record" else 1)
        assert len(events(db, task_id)) == 1  # one final event
    o = org_row(db, org.id)
    assert (o.queued, o.running) == (0, 0)
    assert o.credits == ledger_sum(db, org.id)


def test_expiry_goes_in_bounded_batches(app: Flask, client: FlaskClient, db: Database, org: Org) -> None:
    wb = waybill(app)
    ids = [submit(client, org, {"type": "echo", "cancelAfter": 1}).get_json()["taskId"] for _ in range(5)]
    later = utcnow() + timedelta(seconds=2)
    assert deadlines.expire_overdue(wb, now=later, batch=2, max_batches=2) == 4
    assert deadlines.expire_overdue(wb, now=later, batch=2, max_batches=2) == 1
    assert {stored(db, t).error_code for t in ids} == {"deadline_exceeded"}
    assert counters(db, org) == (1000, 0, 0)


def test_the_overdue_look_up_is_a_range_of_the_status_deadline_index(db: Database) -> None:
    if db.engine.dialect.name != "sqlite":
        pytest.skip("the plan is checked on SQLite; PostgreSQL's depends on its table statistics")
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(db.read_engine, "before_cursor_execute", capture)
    try:
        with db.read_session() as s:  # where the sweep reads it
            assert sweep_service.overdue(s, TaskStatus.QUEUED, now=utcnow()) == []
    finally:
        event.remove(db.read_engine, "before_cursor_execute", capture)
    [(statement, parameters)] = [(q, p) for q, p in seen if "deadline_at" in q]
    with db.engine.connect() as conn:
        plan = " ".join(
            str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
        )
    assert "ix_tasks_status_deadline" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # read in deadline order from the index, not sorted


def test_the_periodic_sweep_runs_the_deadlines(
    app: Flask, client: FlaskClient, db: Database, org: Org
) -> None:
    wb = waybill(app)
    wb.dispatcher.mark_epoch()  # Redis holds its state: the sweep does not rebuild it
    task_id = submit(client, org, {"type": "echo", "cancelAfter": 60}).get_json()["taskId"]
    done = sweep.run_sweep(wb)
    assert done["deadlines"] == 0 and stored(db, task_id).status == "queued"
    make_due(db, task_id)
    done = sweep.run_sweep(wb)
    assert done["deadlines"] == 1
    assert stored(db, task_id).error_code == "deadline_exceeded"


# -- expiry at the claim -----------------------------------------------------------------


def test_a_claim_past_the_deadline_does_not_start_the_task(
    app: Flask,
    client: FlaskClient,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    fake_redis: fakeredis.FakeRedis,
) -> None:
    wb = waybill(app)
    task_id = submit(
        client, org, {"type": "echo", "input": {"x": 1}, "cancelAfter": 30, "webhook": {"url": HOOK}}
    ).get_json()["taskId"]
    make_due(db, task_id)
    pubsub = fake_redis.pubsub()
    pubsub.subscribe(keys.DONE_CHANNEL + task_id)
    outcome = run.execute(db, REGISTRY, RUN, task_id, wb.dispatch)
    assert (outcome.ran, outcome.recorded, outcome.status) == (False, True, "canceled")
    row = stored(db, task_id)
    assert row.status == "canceled" and row.error_code == "deadline_exceeded"
    assert row.started_at is None and row.attempts == 0 and row.result is None  # never started
    assert counters(db, org) == (1000, 0, 0) and refunds(db, task_id) == 1
    assert [e for e, _ in events(db, task_id)] == ["task.canceled"]
    assert outcome.delivery_id is not None and (outcome.delivery_id, None) in publisher.deliveries
    assert fake_redis.zscore(keys.LEASES, task_id) is None  # its slot is free
    messages = [pubsub.get_message(timeout=1.0) for _ in range(2)]
    assert b"canceled" in [m["data"] for m in messages if m and m["type"] == "message"]


def test_a_claim_does_not_take_over_a_dead_run_past_its_deadline(db: Database, org: Org) -> None:
    with db.session() as s:
        task_id = submission.submit(
            s, org.id, submission.SubmitRequest(type="echo", cancel_after=10), registry=REGISTRY
        ).task.id
    now = utcnow()
    with db.session() as s:
        assert lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now).attempt == 1
    # A live run past its deadline is left to the sweep (which revokes it): the claim is BUSY.
    with db.session() as s:
        busy = lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now + timedelta(seconds=4))
    assert busy.reason == lifecycle.ClaimReason.BUSY and stored(db, task_id).status == "running"
    # Its worker died; by the next claim the deadline has passed: canceled, not attempt 2.
    with db.session() as s:
        late = lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now + timedelta(seconds=11))
    assert late.task is None and late.reason == lifecycle.ClaimReason.EXPIRED
    assert late.ended == TaskStatus.CANCELED
    row = stored(db, task_id)
    assert (row.status, row.error_code, row.attempts) == ("canceled", "deadline_exceeded", 1)
    assert counters(db, org) == (1000, 0, 0)


def test_a_claim_before_the_deadline_runs_the_task(db: Database, org: Org) -> None:
    with db.session() as s:
        task_id = submission.submit(
            s, org.id, submission.SubmitRequest(type="echo", input=7, cancel_after=60), registry=REGISTRY
        ).task.id
    outcome = run.execute(db, REGISTRY, RUN, task_id)
    assert outcome.ran and outcome.status == "succeeded"
    assert stored(db, task_id).result == 7


# -- a client's cancel -------------------------------------------------------------------


def test_a_client_cancel_carries_error_code_canceled(
    client: FlaskClient, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    task_id = submit(client, org, {"type": "echo", "webhook": {"url": HOOK}, "cancelAfter": 60}).get_json()[
        "taskId"
    ]
    r = client.post(f"/v1/tasks/{task_id}/cancel", headers=org.headers)
    assert r.status_code == 200
    body = r.get_json()
    assert body["status"] == "canceled"
    assert body["error"]["code"] == "canceled" and body["error"]["message"]
    assert client.get(f"/v1/tasks/{task_id}", headers=org.headers).get_json()["error"] == body["error"]
    [(event, payload)] = events(db, task_id)
    assert event == "task.canceled" and payload["data"]["error"]["code"] == "canceled"
    # The deadline, later, finds it final.
    assert stored(db, task_id).deadline_at is not None
    with db.session() as s:
        assert not lifecycle.expire(s, task_id, now=utcnow() + timedelta(seconds=120)).done
    assert refunds(db, task_id) == 1 and len(events(db, task_id)) == 1
    assert counters(db, org) == (1000, 0, 0)
