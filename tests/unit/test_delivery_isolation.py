"""Delivery isolation: slots per organization and host, parking, circuits per host, Redis away.

The attempt's exchange is replaced by a recorder (``sent``) that answers what
the test says; everything else is the real path: the claim and record in SQL,
the scripts on fakeredis, the publisher that stands in for Celery.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import fakeredis
import pytest
from flask import Flask

from app import create_app, metrics
from app.container import Waybill
from app.db import Database
from app.models import WebhookDelivery
from app.models.base import utcnow
from app.services import circuits, deliveries, submission
from app.services.circuits import snapshot
from app.services.delivery_slots import DeliverySlots, SlotSettings
from app.services.task_types import Registry
from app.usecases import deliver, run
from app.usecases import sweep as sweep_usecase
from config import Settings
from tests.conftest import RecordingPublisher
from tests.support import Org, make_org

REG = Registry.from_entry_points()
RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=True)
HOST_A = "https://a.example/hook"
HOST_B = "https://b.example/hook"


@pytest.fixture
def wb(
    settings: Settings, db: Database, publisher: RecordingPublisher, fake_redis: fakeredis.FakeRedis
) -> Waybill:
    app: Flask = create_app(
        settings.with_overrides(
            webhook_max_per_organization=2,
            webhook_max_per_host=3,
            webhook_circuit_failures=3,
            webhook_circuit_cooldown_seconds=30,
            webhook_circuit_max_seconds=120,
        ),
        db=db,
        publisher=publisher,
        redis_client=fake_redis,
    )
    waybill: Waybill = app.extensions["waybill"]
    waybill.dispatcher.mark_epoch()  # the sweep must not rebuild dispatch state in these tests
    return waybill


Answer = tuple[str, int | None]  # outcome, response status


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The exchange, replaced: records each attempt sent and answers ``box["answer"]``."""
    box: dict[str, Any] = {"ids": [], "answer": ("delivered", 200)}

    def send_attempt(plan: deliveries.AttemptPlan, **_kw: Any) -> deliveries.AttemptOutcome:
        box["ids"].append(plan.delivery_id)
        answer = box["answer"]
        outcome, status = answer(plan) if callable(answer) else answer
        return deliveries.AttemptOutcome(outcome, status, 3, None if status else outcome)

    monkeypatch.setattr(deliveries, "send_attempt", send_attempt)
    yield box


def _delivery(db: Database, org: Org, url: str = HOST_A) -> str:
    """A finished task's pending ``task.succeeded`` delivery, due now."""
    with db.session() as s:
        task_id = submission.submit(
            s, org.id, submission.SubmitRequest(type="echo", input={}, webhook_url=url), registry=REG
        ).task.id
    outcome = run.execute(db, REG, RUN, task_id)
    assert outcome.delivery_id is not None
    return outcome.delivery_id


def _row(db: Database, delivery_id: str) -> WebhookDelivery:
    with db.session() as s:
        row = s.get(WebhookDelivery, delivery_id)
        assert row is not None
        s.expunge(row)
        return row


def _deferred(reason: str) -> float:
    return float(metrics.WEBHOOK_DEFERRED.labels(reason)._value.get())


def _hold_slots(fake_redis: fakeredis.FakeRedis, org_id: str, host: str, n: int) -> list[str]:
    """Slots held by attempts in flight elsewhere (another worker)."""
    slots = DeliverySlots(fake_redis, SlotSettings(per_organization=0, per_host=0))
    members = [f"elsewhere-{i}" for i in range(n)]
    for m in members:
        assert slots.acquire(org_id, host, "msg_elsewhere", m) == "ok"
    return members


# -- slots ---------------------------------------------------------------------------------


def test_slots_bound_an_organization_and_a_host_and_freed_slots_go_round_robin(
    fake_redis: fakeredis.FakeRedis,
) -> None:
    slots = DeliverySlots(fake_redis, SlotSettings(per_organization=2, per_host=3))
    assert slots.acquire("A", "h:1", "a1", "a1:x") == "ok"
    assert slots.acquire("A", "h:1", "a2", "a2:x") == "ok"
    for i in range(3, 7):  # A's backlog: parked, not sent
        assert slots.acquire("A", "h:1", f"a{i}", f"a{i}:x") == "organization"
    assert slots.acquire("B", "h:1", "b1", "b1:x") == "ok"  # B is not behind A's backlog
    assert slots.acquire("C", "h:1", "c1", "c1:x") == "host"  # h:1 holds 3: C waits for the host
    assert slots.acquire("C", "h:2", "c2", "c2:x") == "ok"  # another host is free
    assert slots.parked_count("A") == 4 and slots.held(["a3", "c1", "b1"]) == {"a3", "c1"}
    assert slots.acquire("A", "h:1", "a3", "a3:y") == "organization"  # a duplicate copy: parked once
    assert slots.parked_count("A") == 4

    # B's attempt ends: h:1 has room, A has none; C's turn comes.
    assert slots.release("B", "h:1", "b1:x") == ["c1"]
    assert slots.acquire("C", "h:1", "c1", "c1:z") == "ok"  # its reservation is converted
    assert slots.in_flight(host="h:1") == 3
    # A's attempt ends: its oldest parked delivery goes, with its slots reserved for it.
    assert slots.release("A", "h:1", "a1:x") == ["a3"]
    assert slots.acquire("A", "h:1", "x-new", "new:1") == "organization"  # the reservation counts
    assert slots.acquire("A", "h:1", "a3", "a3:z") == "ok"
    assert slots.in_flight(org_id="A") == 2 and slots.parked_count("A") == 4  # a4..a6, x-new


def test_a_slot_of_a_dead_sender_frees_itself_at_expiry(fake_redis: fakeredis.FakeRedis) -> None:
    slots = DeliverySlots(fake_redis, SlotSettings(per_organization=1, per_host=0, lease_seconds=10))
    now = int(time.time() * 1000)
    assert slots.acquire("A", "h:1", "a1", "a1:x", now_ms=now) == "ok"  # then its worker dies
    assert slots.acquire("A", "h:1", "a2", "a2:x", now_ms=now + 1000) == "organization"
    assert slots.release(now_ms=now + 11_000) == ["a2"]  # the sweep's step, after the lease


# -- the use case: deferral keeps the attempt count and the schedule --------------------------


def test_no_slot_defers_without_an_attempt_and_a_freed_slot_sends_it(
    wb: Waybill,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    fake_redis: fakeredis.FakeRedis,
    sent: dict[str, Any],
) -> None:
    delivery_id = _delivery(db, org)
    before = _row(db, delivery_id)
    held = _hold_slots(fake_redis, org.id, circuits.host_of(HOST_A), 2)
    deferred = _deferred("organization_limit")

    assert deliver.deliver(wb, delivery_id) == "deferred"
    after = _row(db, delivery_id)
    assert sent["ids"] == [] and publisher.deliveries == []
    assert after.status == "pending" and after.attempts == 0 and after.claimed_until is None
    assert after.next_attempt_at == before.next_attempt_at  # still due: it waits for a slot, not a time
    assert _deferred("organization_limit") == deferred + 1
    # The sweep finds it overdue in SQL but leaves it to Redis, which holds it.
    assert deliver.unheld(wb, [delivery_id, "msg_other"]) == ["msg_other"]

    # The other worker's attempt ends: the release step hands the delivery on.
    slots = DeliverySlots(fake_redis, SlotSettings(per_organization=2, per_host=3))
    assert slots.release(org.id, circuits.host_of(HOST_A), held[0]) == [delivery_id]
    assert deliver.deliver(wb, delivery_id) == "delivered"
    assert sent["ids"] == [delivery_id]
    done = _row(db, delivery_id)
    assert done.status == "delivered" and done.attempts == 1
    assert slots.in_flight(org_id=org.id) == 1  # its own slot was given back; the other still held


def test_a_deferred_retry_keeps_its_count_and_its_schedule(
    wb: Waybill, db: Database, org: Org, fake_redis: fakeredis.FakeRedis, sent: dict[str, Any]
) -> None:
    delivery_id = _delivery(db, org)
    sent["answer"] = ("http_error", 500)
    assert deliver.deliver(wb, delivery_id) == "http_error"
    with db.session() as s:  # the retry's countdown has passed
        row = s.get(WebhookDelivery, delivery_id)
        assert row is not None and row.attempts == 1
        row.next_attempt_at = utcnow() - timedelta(seconds=1)
    due = _row(db, delivery_id).next_attempt_at
    _hold_slots(fake_redis, org.id, circuits.host_of(HOST_A), 2)
    for _ in range(3):  # however often it is turned away
        assert deliver.deliver(wb, delivery_id) == "deferred"
    row = _row(db, delivery_id)
    assert row.attempts == 1 and row.max_attempts == 5 and row.next_attempt_at == due
    assert sent["ids"] == [delivery_id]


def test_the_first_attempt_from_a_tasks_worker_thread_obeys_the_bounds(
    wb: Waybill,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    fake_redis: fakeredis.FakeRedis,
    sent: dict[str, Any],
) -> None:
    _hold_slots(fake_redis, org.id, circuits.host_of(HOST_A), 2)
    outcomes: list[str] = []

    class Inline:  # the FirstAttempts protocol, sending on the caller's thread
        def reserve(self) -> bool:
            return True

        def start(self, plan: deliveries.AttemptPlan) -> None:
            outcomes.append(deliver.send_claimed(wb, plan))

        def release(self) -> None:
            pass

    with db.session() as s:
        task_id = submission.submit(
            s, org.id, submission.SubmitRequest(type="echo", input={}, webhook_url=HOST_A), registry=REG
        ).task.id
    outcome = run.execute(db, REG, RUN, task_id, wb.dispatch, Inline())
    assert outcome.delivery_id is not None
    assert outcomes == ["deferred"] and sent["ids"] == []
    row = _row(db, outcome.delivery_id)
    assert row.claimed_until is None and row.attempts == 0  # any webhooks worker may claim it later
    assert DeliverySlots(fake_redis, SlotSettings()).held([outcome.delivery_id]) == {outcome.delivery_id}


# -- circuits ------------------------------------------------------------------------------


def _open_circuit(wb: Waybill, db: Database, org: Org, sent: dict[str, Any]) -> list[str]:
    sent["answer"] = ("connection_refused", None)
    ids = [_delivery(db, org) for _ in range(3)]
    for delivery_id in ids:
        assert deliver.deliver(wb, delivery_id) == "connection_refused"
    return ids


def test_a_host_that_keeps_refusing_opens_its_circuit_and_its_deliveries_wait_uncounted(
    wb: Waybill,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    fake_redis: fakeredis.FakeRedis,
    sent: dict[str, Any],
) -> None:
    other = make_org(db, "other")
    first = _open_circuit(wb, db, org, sent)
    [state] = snapshot(fake_redis)
    assert state["host"] == "a.example:443" and state["state"] == "open"
    assert state["consecutive_failures"] == 3
    assert state["opened_at"] < state["next_probe_at"]

    later = _delivery(db, org)
    deferred = _deferred("circuit_open")
    assert deliver.deliver(wb, later) == "deferred"
    row = _row(db, later)
    assert row.attempts == 0 and row.status == "pending" and row.claimed_until is None
    probe_at = row.next_attempt_at
    assert probe_at is not None and probe_at - utcnow() > timedelta(seconds=25)  # the next probe, ~30 s
    assert _deferred("circuit_open") == deferred + 1
    assert len(sent["ids"]) == 3  # no worker spent on it
    # Another host, another organization: not affected.
    sent["answer"] = ("delivered", 200)
    assert deliver.deliver(wb, _delivery(db, other, HOST_B)) == "delivered"
    # The sweep does not publish the waiting delivery (SQL: not due; Redis: held).
    assert deliver.unheld(wb, [later]) == []
    assert deliver.hand_on_held(wb) == {"drained": 0, "circuit": 0}
    assert all(d != later for d, _ in publisher.deliveries)
    # The first three keep their retry schedule (attempt 1, retry pending).
    assert {_row(db, d).attempts for d in first} == {1}


def _make_probe_due(fake_redis: fakeredis.FakeRedis, host: str) -> None:
    fake_redis.hset(circuits.circuit_key(host), "next_probe_at", int(time.time() * 1000) - 1)


def test_one_probe_after_the_cooldown_closes_the_circuit_and_the_waiting_deliveries_go(
    wb: Waybill,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    fake_redis: fakeredis.FakeRedis,
    sent: dict[str, Any],
) -> None:
    _open_circuit(wb, db, org, sent)
    waiting = [_delivery(db, org) for _ in range(3)]
    for delivery_id in waiting:
        assert deliver.deliver(wb, delivery_id) == "deferred"
    host = "a.example:443"
    _make_probe_due(fake_redis, host)
    publisher.deliveries.clear()
    assert deliver.hand_on_held(wb)["circuit"] == 1  # one of them is published as the probe
    [(probe_id, _)] = publisher.deliveries
    assert probe_id == waiting[0]

    # While the probe is in flight, another attempt to the host waits for its end.
    newcomer = _delivery(db, org)
    sent["answer"] = lambda plan: (
        ("delivered", 200) if deliver.deliver(wb, newcomer) == "deferred" else ("error", None)
    )
    publisher.deliveries.clear()
    assert deliver.deliver(wb, probe_id) == "delivered"
    assert snapshot(fake_redis) == []  # closed
    sent["answer"] = ("delivered", 200)
    # Closing handed on everything that waited for the host, due now.
    assert sorted(d for d, _ in publisher.deliveries) == sorted([*waiting[1:], newcomer])
    for delivery_id in [*waiting[1:], newcomer]:
        assert deliver.deliver(wb, delivery_id) == "delivered"
        assert _row(db, delivery_id).attempts == 1  # the deferrals were not attempts


def test_a_failed_probe_opens_the_circuit_again_for_longer(
    wb: Waybill,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    fake_redis: fakeredis.FakeRedis,
    sent: dict[str, Any],
) -> None:
    _open_circuit(wb, db, org, sent)
    waiting = _delivery(db, org)
    assert deliver.deliver(wb, waiting) == "deferred"
    host = "a.example:443"
    _make_probe_due(fake_redis, host)
    deliver.hand_on_held(wb)
    sent["answer"] = ("timeout", None)
    assert deliver.deliver(wb, waiting) == "timeout"  # the probe: a real attempt, counted
    [state] = snapshot(fake_redis)
    assert state["state"] == "open" and state["consecutive_failures"] == 4
    assert int(fake_redis.hget(circuits.circuit_key(host), "cooldown") or 0) == 60  # 30 s doubled
    assert _row(db, waiting).attempts == 1


def test_http_errors_mean_the_host_is_up(wb: Waybill, db: Database, org: Org, sent: dict[str, Any]) -> None:
    sent["answer"] = ("http_error", 503)
    for _ in range(4):
        assert deliver.deliver(wb, _delivery(db, org)) == "http_error"
    assert snapshot(wb.redis) == []


def test_a_probe_lock_left_by_a_dead_prober_expires(fake_redis: fakeredis.FakeRedis) -> None:
    c = circuits.Circuits(fake_redis, circuits.CircuitSettings(failures=1, probe_hold_seconds=5))
    assert c.record("h:1", "timeout", None, probe=False, token="") == "opened"
    fake_redis.hset(circuits.circuit_key("h:1"), "next_probe_at", 0)
    assert c.gate("h:1", "d1", "t1").action == "probe"  # then its worker dies
    assert snapshot(fake_redis)[0]["state"] == "half_open"
    waiting = c.gate("h:1", "d2", "t2")
    assert waiting.action == "wait" and waiting.until_ms - time.time() * 1000 <= 5000
    fake_redis.delete(circuits.probe_key("h:1"))  # what its expiry does
    assert c.gate("h:1", "d3", "t3").action == "probe"


# -- Redis away ----------------------------------------------------------------------------


def test_without_redis_attempts_go_out_as_before_and_nothing_is_lost(
    wb: Waybill,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    fake_server: fakeredis.FakeServer,
    sent: dict[str, Any],
) -> None:
    ids = [_delivery(db, org) for _ in range(4)]  # more than the organization's 2 slots
    fake_server.connected = False
    assert [deliver.deliver(wb, d) for d in ids] == ["delivered"] * 4
    assert sent["ids"] == ids
    assert deliver.unheld(wb, ["msg_x"]) == ["msg_x"]  # the sweep publishes every overdue one
    assert deliver.hand_on_held(wb) == {"drained": 0, "circuit": 0}
    assert snapshot_or_none(wb) is None


def snapshot_or_none(wb: Waybill) -> list[dict[str, Any]] | None:
    try:
        return snapshot(wb.redis)
    except Exception:
        return None


def test_the_sweep_publishes_a_parked_delivery_that_redis_lost(
    wb: Waybill,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    fake_redis: fakeredis.FakeRedis,
    sent: dict[str, Any],
    settings: Settings,
) -> None:
    delivery_id = _delivery(db, org)
    _hold_slots(fake_redis, org.id, circuits.host_of(HOST_A), 2)
    assert deliver.deliver(wb, delivery_id) == "deferred"
    fake_redis.flushall()  # Redis restarted empty: the parking is gone
    wb.dispatcher.mark_epoch()
    with db.session() as s:
        row = s.get(WebhookDelivery, delivery_id)
        assert row is not None
        row.next_attempt_at = utcnow() - timedelta(seconds=settings.sweep_grace_seconds + 1)
    publisher.deliveries.clear()
    done = sweep_usecase.run_sweep(wb)
    assert done["webhooks"] == 1 and (delivery_id, None) in publisher.deliveries


def test_the_sender_that_frees_a_slot_sends_the_next_in_turn_itself(
    wb: Waybill,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    fake_redis: fakeredis.FakeRedis,
    sent: dict[str, Any],
) -> None:
    _hold_slots(fake_redis, org.id, circuits.host_of(HOST_A), 1)
    first, second = _delivery(db, org), _delivery(db, org)
    turned_away: list[str] = []

    def answer(plan: deliveries.AttemptPlan) -> tuple[str, int]:
        if plan.delivery_id == first:  # while it is in flight, the organization's 2 slots are held
            turned_away.append(deliver.deliver(wb, second))
        return "delivered", 200

    sent["answer"] = answer
    assert deliver.deliver(wb, first) == "delivered"
    assert turned_away == ["deferred"]
    assert sent["ids"] == [first, second] and publisher.deliveries == []  # no queue hop
    assert _row(db, second).status == "delivered" and _row(db, second).attempts == 1
