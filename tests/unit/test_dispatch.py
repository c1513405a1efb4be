"""The fair dispatcher's Redis scripts, on fakeredis (with Lua)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import cast

import fakeredis
import pytest

from app.db import Database
from app.dispatch import Dispatch, Dispatcher, DispatchSettings, keys
from app.dispatch.state import DRAIN_TAU_SECONDS
from app.models import Task
from app.models.base import utcnow
from app.services import submission, sweep
from app.services.task_types import Registry
from app.usecases import recovery
from tests.conftest import RecordingPublisher
from tests.support import Org, make_org


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def make(r: fakeredis.FakeRedis, target: int = 100, lease: float = 300) -> Dispatcher:
    return Dispatcher(r, DispatchSettings(queue_target=target, release_lease_seconds=lease))


def test_organizations_are_served_in_turn(r: fakeredis.FakeRedis) -> None:
    d = make(r)
    for i in range(50):
        d.enqueue("A", f"a{i}", 100)
    for i in range(3):
        d.enqueue("B", f"b{i}", 100)
    d.enqueue("C", "c0", 100)
    released = d.step()
    assert released[:7] == ["a0", "b0", "c0", "a1", "b1", "a2", "b2"]
    assert released[7:] == [f"a{i}" for i in range(3, 50)]


def test_a_newcomer_waits_one_turn_not_the_backlog(r: fakeredis.FakeRedis) -> None:
    d = make(r, target=2)
    for i in range(1000):
        d.enqueue("A", f"a{i}", 100)
    assert d.step() == ["a0", "a1"]  # two released, no worker has started them yet
    d.enqueue("B", "b0", 100)
    assert d.step() == []  # the target of ready tasks is reached: nothing more is released
    assert d.renew("a0", 60)
    assert d.renew("a1", 60)  # the workers started both
    assert d.step() == ["a2", "b0"]  # one turn of the ring, not A's 997 waiting tasks


def test_the_room_is_released_tasks_no_worker_has_started(r: fakeredis.FakeRedis) -> None:
    """Whatever the broker: dispatch counts what it released, not a queue's length."""
    d = make(r, target=3)
    for i in range(10):
        d.enqueue("A", f"a{i}", 100)
    assert d.step() == ["a0", "a1", "a2"]
    assert r.scard(keys.READY) == 3
    d.release("a0")  # finished (or canceled) before its first renewal
    assert d.step() == ["a3"]
    d.give_back("a1")  # its run message could not be published
    assert r.scard(keys.READY) == 2
    # The next step puts a1 back in front and releases it again, then a4.
    assert d.step() == ["a1"]
    assert d.renew("a2", 60) and d.renew("a3", 60)
    assert d.step() == ["a4", "a5"]
    now = time.time()
    # Every lease expired (no worker renewed): all five back in front, three
    # released again, and the room counts only those three.
    again = d.step(now + 400)
    assert len(again) == 3 and set(again) <= {"a1", "a2", "a3", "a4", "a5"}
    assert {m.decode() for m in cast(set[bytes], r.smembers(keys.READY))} == set(again)


def test_concurrency_limit_counts_unexpired_leases(r: fakeredis.FakeRedis) -> None:
    d = make(r)
    for i in range(5):
        d.enqueue("A", f"a{i}", 2)
    assert d.step() == ["a0", "a1"]
    assert d.step() == []
    assert d.running("A") == 2
    d.release("a0")
    assert d.step() == ["a2"]


def test_an_expired_lease_puts_the_task_back_in_front(r: fakeredis.FakeRedis) -> None:
    d = make(r, lease=10)
    for i in range(3):
        d.enqueue("A", f"a{i}", 1)
    now = time.time()
    assert d.step(now) == ["a0"]
    assert d.step(now + 5) == []  # a0's lease is live: the slot is taken
    assert d.step(now + 11) == ["a0"]  # its worker died: released again, before a1
    assert d.renew("a0", 60)
    assert d.step(now + 25) == []  # renewed by the run's heartbeat


def test_enqueue_is_idempotent_and_release_removes_a_waiting_task(r: fakeredis.FakeRedis) -> None:
    d = make(r)
    assert d.enqueue("A", "a0", 5)
    assert not d.enqueue("A", "a0", 5)
    d.enqueue("A", "a1", 5)
    assert d.step() == ["a0", "a1"]
    assert not d.enqueue("A", "a0", 5)  # leased: not enqueued twice
    d.enqueue("A", "a2", 5)
    d.release("a2", "A")  # canceled while waiting
    assert d.step() == []
    assert r.llen(keys.RING) == 0


def test_rebuild_restores_waiting_tasks_from_sql(db: Database, org: Org, r: fakeredis.FakeRedis) -> None:
    other = make_org(db, "other")
    registry = Registry.from_entry_points()
    ids = []
    for who in (org, other, org):
        with db.session() as s:
            ids.append(
                submission.submit(s, who.id, submission.SubmitRequest(type="echo"), registry=registry).task.id
            )
    d = make(r)
    assert not d.has_epoch()
    assert recovery.rebuild(db, d) == 3
    assert d.has_epoch()
    assert sorted(d.step()) == sorted(ids)


def test_enqueue_steps_and_publishes_and_the_sweep_confirms_it(
    db: Database, org: Org, r: fakeredis.FakeRedis, publisher: RecordingPublisher
) -> None:
    d = make(r)
    registry = Registry.from_entry_points()
    with db.session() as s:
        first = submission.submit(s, org.id, submission.SubmitRequest(type="echo"), registry=registry)
        second = submission.submit(s, org.id, submission.SubmitRequest(type="echo"), registry=registry)
    assert Dispatch(lambda: d, publisher).enqueue(first.task.id, org.id, first.concurrency_limit)
    assert publisher.tasks == [first.task.id]
    # The second only waits in Redis: as many tasks as the target wait for a worker.
    for i in range(d.settings.queue_target - 1):
        d.enqueue("filler", f"filler-{i}", 100)
    assert len(d.step()) == d.settings.queue_target - 1
    assert Dispatch(lambda: d, publisher).enqueue(second.task.id, org.id, second.concurrency_limit)
    assert publisher.tasks == [first.task.id]
    with db.session() as s:
        assert s.get(Task, first.task.id).dispatched_at is None  # type: ignore[union-attr]
    # The sweep's confirmation: both are in Redis (leased, waiting), none is
    # added again, both are marked and not looked at again.
    assert recovery.enqueue_from_sql(db, d, [first.task.id, second.task.id]) == 0
    with db.session() as s:
        assert s.get(Task, first.task.id).dispatched_at is not None  # type: ignore[union-attr]
        assert s.get(Task, second.task.id).dispatched_at is not None  # type: ignore[union-attr]
        assert sweep.unconfirmed(s, grace_seconds=0, now=utcnow() + timedelta(seconds=1)) == []
    assert d.step() == []
    d.release(first.task.id)
    assert d.step() == [second.task.id]


def test_enqueue_with_redis_down_leaves_it_to_the_sweep(
    db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    d = make(fakeredis.FakeRedis(server=server))
    with db.session() as s:
        submitted = submission.submit(
            s, org.id, submission.SubmitRequest(type="echo"), registry=Registry.from_entry_points()
        )
    assert not Dispatch(lambda: d, publisher).enqueue(submitted.task.id, org.id, 10)
    with db.session() as s:
        assert s.get(Task, submitted.task.id).dispatched_at is None  # type: ignore[union-attr]
    server.connected = True
    assert recovery.enqueue_from_sql(db, d, [submitted.task.id]) == 1
    assert d.step() == [submitted.task.id]


def test_an_orphaned_run_comes_back_even_when_redis_holds_a_stale_lease(
    db: Database, org: Org, r: fakeredis.FakeRedis
) -> None:
    d = make(r, lease=3600)
    with db.session() as s:
        submitted = submission.submit(
            s, org.id, submission.SubmitRequest(type="echo"), registry=Registry.from_entry_points()
        )
    task_id = submitted.task.id
    d.enqueue(org.id, task_id, 10)
    assert d.step() == [task_id]  # released with an hour-long lease, then its worker dies
    assert not d.enqueue(org.id, task_id, 10)  # a plain enqueue respects the lease
    assert d.step() == []
    assert recovery.enqueue_from_sql(db, d, [task_id], drop_leases=True) == 1
    assert d.step() == [task_id]


def test_the_drain_rate_counts_releases_and_decays(r: fakeredis.FakeRedis) -> None:
    d = make(r)
    for i in range(30):
        d.enqueue("A", f"a{i}", 100)
    assert d.drain_rate("A", now=1000.0) == 0.0
    assert len(d.step(now=1000.0)) == 30
    # 30 releases at once: 30 / tau, then halving every tau * ln 2.
    assert d.drain_rate("A", now=1000.0) == pytest.approx(30 / DRAIN_TAU_SECONDS, rel=1e-6)
    later = 1000.0 + DRAIN_TAU_SECONDS * 0.6931471805599453
    assert d.drain_rate("A", now=later) == pytest.approx(15 / DRAIN_TAU_SECONDS, rel=1e-6)
    assert d.drain_rate("B", now=1000.0) == 0.0
    assert submission.retry_after(d.drain_rate("A", now=1000.0)) == 2  # a place every 2 s
    assert submission.retry_after(0.0) == 60  # nothing drained lately: a minute
    assert submission.retry_after(1000.0) == 1


def test_finish_and_step_frees_the_slot_notifies_and_refills_in_one_go(r: fakeredis.FakeRedis) -> None:
    d = make(r)
    for i in range(3):
        d.enqueue("A", f"a{i}", 1)
    assert d.step() == ["a0"]  # concurrency limit 1
    listener = r.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(keys.DONE_CHANNEL + "a0")
    listener.get_message(timeout=1)
    assert d.finish_and_step("a0", notify=(keys.DONE_CHANNEL + "a0", "succeeded")) == ["a1"]
    assert listener.get_message(timeout=1)["data"] == b"succeeded"
    assert d.running("A") == 1
    r.script_flush()  # a restarted Redis forgets its scripts
    assert d.finish_and_step("a1") == ["a2"]
    assert d.finish_and_step("a2") == []
    assert d.running("A") == 0


def test_enqueue_and_step_is_enqueue_then_step(r: fakeredis.FakeRedis) -> None:
    d = make(r, target=2)
    assert d.enqueue_and_step("A", "a0", 5) == ["a0"]
    assert d.enqueue_and_step("A", "a0", 5) == []  # leased already: not enqueued twice
    assert d.enqueue_and_step("B", "b0", 5) == ["b0"]  # two ready tasks: the target
    r.script_flush()
    assert d.enqueue_and_step("A", "a1", 5) == []
    assert r.lrange(keys.waiting_key("A"), 0, -1) == [b"a1"]


def test_a_script_redis_does_not_know_yet_loses_no_released_task(r: fakeredis.FakeRedis) -> None:
    d = make(r, target=2)
    for i in range(5):
        d.enqueue("A", f"a{i}", 10)
    leased = d.step()  # Redis knows the step script now, but not the release script
    assert leased == ["a0", "a1"]
    # Workers started both (their renewal, done without a script here, so
    # that Redis still does not know the release script): room for two more.
    r.srem(keys.READY, "a0", "a1")
    # The pipeline's release fails (NOSCRIPT) while its step releases two
    # more (a2, a3); then it loads the scripts and runs again (a0 released,
    # the target reached again): every released id is returned for
    # publishing, none is left leased without a message.
    leased += d.finish_and_step("a0")
    assert leased == ["a0", "a1", "a2", "a3"]
    members = cast(list[bytes], r.zrange(keys.LEASES, 0, -1))  # bytes: no decode_responses
    assert sorted(m.decode() for m in members) == ["a1", "a2", "a3"]


def test_renew_can_announce_the_start_in_the_same_round_trip(r: fakeredis.FakeRedis) -> None:
    d = make(r)
    d.enqueue("acme", "a0", 1)
    assert d.step() == ["a0"]
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.DONE_CHANNEL + "a0")
    assert d.renew("a0", 60, notify=(keys.DONE_CHANNEL + "a0", "running"))
    deadline, message = time.monotonic() + 2, None
    while message is None and time.monotonic() < deadline:  # the first call may see the subscription
        message = pubsub.get_message(timeout=0.1)
    assert message is not None and message["data"] in (b"running", "running")
    assert (r.zscore(keys.LEASES, "a0") or 0) > (time.time() + 50) * 1000
    assert not d.renew("gone", 60, notify=(keys.DONE_CHANNEL + "gone", "running"))
    pubsub.close()
