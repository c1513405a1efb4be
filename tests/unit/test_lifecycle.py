"""The task state machine, credits and the sweep, at the service level."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from app.db import Database
from app.models import CreditEntry, Organization, Task, TaskStatus
from app.models.base import utcnow
from app.services import lifecycle, submission, sweep
from app.services.task_types import Registry, TaskContext, TaskError, TaskType
from app.usecases import run
from tests.support import Org
from tests.support.orgs import ledger_sum as _ledger_sum
from tests.support.orgs import organization as _org


def _submit(db: Database, org: Org, type_: str = "echo", **kw) -> str:
    with db.session() as s:
        return submission.submit(
            s, org.id, submission.SubmitRequest(type=type_, **kw), registry=Registry.from_entry_points()
        ).task.id


def _task(db: Database, task_id: str) -> Task:
    with db.session() as s:
        task = s.get(Task, task_id)
        assert task is not None
        return task


def boom(_input, _ctx: TaskContext):
    raise RuntimeError("kaput")


def refuse(_input, _ctx: TaskContext):
    raise TaskError("bad_luck", "no")


REGISTRY = Registry.from_entry_points()
REGISTRY.add(TaskType(name="boom", cost=3, description="fails", handler=boom))
REGISTRY.add(TaskType(name="refuse", cost=3, description="fails", handler=refuse))
REGISTRY.add(TaskType(name="free_boom", cost=0, description="fails, free", handler=boom))
RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)


def _submit_custom(db: Database, org: Org, type_: str) -> str:
    with db.session() as s:
        return submission.submit(s, org.id, submission.SubmitRequest(type=type_), registry=REGISTRY).task.id


def test_run_moves_queued_to_succeeded_and_counters_follow(db: Database, org: Org) -> None:
    task_id = _submit(db, org, input={"x": 1})
    assert (_org(db, org.id).queued, _org(db, org.id).running) == (1, 0)
    outcome = run.execute(db, REGISTRY, RUN, task_id)
    assert outcome.recorded and outcome.status == "succeeded"
    task = _task(db, task_id)
    assert task.status == "succeeded" and task.result == {"x": 1}
    assert task.started_at is not None and task.completed_at is not None
    assert (_org(db, org.id).queued, _org(db, org.id).running) == (0, 0)
    assert _org(db, org.id).credits == 999
    assert _org(db, org.id).credits == _ledger_sum(db, org.id)


def test_the_same_message_twice_records_one_result(db: Database, org: Org) -> None:
    task_id = _submit(db, org)
    first = run.execute(db, REGISTRY, RUN, task_id)
    second = run.execute(db, REGISTRY, RUN, task_id)
    assert first.recorded and not second.ran
    assert _task(db, task_id).attempts == 1


@pytest.mark.parametrize(("type_", "code"), [("boom", "handler_error"), ("refuse", "bad_luck")])
def test_handler_failure_fails_the_task_and_refunds_once(
    db: Database, org: Org, type_: str, code: str
) -> None:
    task_id = _submit_custom(db, org, type_)
    assert _org(db, org.id).credits == 997
    outcome = run.execute(db, REGISTRY, RUN, task_id)
    assert outcome.status == "failed"
    task = _task(db, task_id)
    assert task.status == "failed" and task.error_code == code and task.error_message
    assert task.result is None
    assert _org(db, org.id).credits == 1000 == _ledger_sum(db, org.id)
    # The failure processed again (a duplicate record, a second refund call): nothing moves.
    with db.session() as s:
        again, _ = lifecycle.record_result(s, task_id, 1, error=("x", "y"))
        assert not lifecycle.fail_task(s, task_id, "again", "again").done
    assert not again
    assert _org(db, org.id).credits == 1000 == _ledger_sum(db, org.id)


def test_a_failed_task_is_marked_refunded_only_when_credits_went_back(db: Database, org: Org) -> None:
    paid, free = _submit_custom(db, org, "boom"), _submit_custom(db, org, "free_boom")
    for task_id in (paid, free):
        assert run.execute(db, REGISTRY, RUN, task_id).status == "failed"
    assert _task(db, paid).refunded is True
    assert _task(db, free).refunded is False  # nothing was reserved, so nothing was given back
    with db.session() as s:
        kinds = s.execute(
            select(CreditEntry.task_id, CreditEntry.kind).where(CreditEntry.task_id.in_([paid, free]))
        ).all()
    assert sorted(map(tuple, kinds)) == sorted([(paid, "reserve"), (paid, "refund")])
    assert _org(db, org.id).credits == 1000 == _ledger_sum(db, org.id)


def _end(db: Database, task_id: str, how: str, barrier: Any, outcomes: list[bool]) -> None:
    barrier.wait()  # the three start together
    with db.session() as s:
        if how == "cancel":
            outcomes.append(lifecycle.finish(s, task_id, TaskStatus.CANCELED).done)
        elif how == "fail":
            outcomes.append(lifecycle.fail_task(s, task_id, "claim_failed", "raced").done)
        else:
            outcomes.append(lifecycle.record_result(s, task_id, 1, error=("boom", "raced"))[0])


def test_racing_ends_of_one_task_refund_it_once(db: Database, org: Org) -> None:
    """A cancel, a last-resort failure and the run's own failed record race for one running task."""
    import threading

    for _ in range(12):
        task_id = _submit_custom(db, org, "boom")
        with db.session() as s:
            assert lifecycle.claim(s, task_id, lease_seconds=30, max_attempts=3).attempt == 1
        barrier = threading.Barrier(3)
        outcomes: list[bool] = []
        threads = [
            threading.Thread(target=_end, args=(db, task_id, how, barrier, outcomes))
            for how in ("cancel", "fail", "record")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == [False, False, True]  # exactly one end won
        with db.session() as s:
            refunds = s.execute(
                select(func.count()).where(CreditEntry.task_id == task_id, CreditEntry.kind == "refund")
            ).scalar_one()
        assert refunds == 1
        assert _task(db, task_id).refunded is True
    o = _org(db, org.id)
    assert (o.credits, o.queued, o.running) == (1000, 0, 0)
    assert _ledger_sum(db, org.id) == 1000


def test_a_dead_workers_task_runs_again_then_fails_after_three_attempts(db: Database, org: Org) -> None:
    task_id = _submit(db, org)
    now = utcnow()
    for attempt in (1, 2, 3):
        with db.session() as s:
            claim = lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now)
            assert claim.task is not None and claim.attempt == attempt
        # A live lease is not taken over.
        with db.session() as s:
            assert lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now).task is None
        now += timedelta(seconds=6)  # the worker died; its lease expires
    with db.session() as s:
        final = lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now)
        assert final.task is None
    task = _task(db, task_id)
    assert task.status == "failed" and task.error_code == "worker_lost"
    assert "3 times" in (task.error_message or "")
    assert _org(db, org.id).running == 0
    assert _org(db, org.id).credits == 1000


def test_a_stale_run_cannot_record_over_a_newer_attempt(db: Database, org: Org) -> None:
    task_id = _submit(db, org)
    now = utcnow()
    with db.session() as s:
        lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now)
    with db.session() as s:
        second = lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3, now=now + timedelta(seconds=10))
        assert second.attempt == 2
    with db.session() as s:
        assert lifecycle.record_result(s, task_id, 1, result="old")[0] is False
    with db.session() as s:
        assert lifecycle.record_result(s, task_id, 2, result="new")[0] is True
    assert _task(db, task_id).result == "new"


def test_a_canceled_running_task_discards_its_result(db: Database, org: Org) -> None:
    task_id = _submit(db, org)
    with db.session() as s:
        lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3)
    with db.session() as s:
        _, ended = lifecycle.cancel(s, org.id, task_id)
        assert ended.was == "running"
    with db.session() as s:
        assert lifecycle.record_result(s, task_id, 1, result="late")[0] is False
    task = _task(db, task_id)
    assert task.status == "canceled" and task.result is None
    assert _org(db, org.id).credits == 1000 and _org(db, org.id).running == 0


def test_lease_renewal_only_for_the_current_attempt(db: Database, org: Org) -> None:
    task_id = _submit(db, org)
    with db.session() as s:
        lifecycle.claim(s, task_id, lease_seconds=5, max_attempts=3)
    with db.session() as s:
        assert lifecycle.renew_lease(s, task_id, 1, utcnow() + timedelta(seconds=60))
        assert not lifecycle.renew_lease(s, task_id, 2, utcnow() + timedelta(seconds=60))


def test_sweep_finds_unconfirmed_and_lease_expired_tasks(db: Database, org: Org) -> None:
    never = _submit(db, org)
    confirmed = _submit(db, org)
    running = _submit(db, org)
    now = utcnow()
    with db.session() as s:
        s.get(Task, confirmed).dispatched_at = now  # type: ignore[union-attr]
        lifecycle.claim(s, running, lease_seconds=5, max_attempts=3, now=now)
    with db.session() as s:
        assert sweep.unconfirmed(s, grace_seconds=10, now=now) == []  # still in their grace period
        assert sweep.plan(s, grace_seconds=10, now=now).orphaned_ids == []
    with db.session() as s:
        found = sweep.plan(s, grace_seconds=10, now=now + timedelta(seconds=16))
        assert sweep.unconfirmed(s, grace_seconds=10, now=now + timedelta(seconds=16)) == [never]
    assert found.orphaned_ids == [running]


def test_reconcile_heals_drifted_counters(db: Database, org: Org) -> None:
    _submit(db, org)
    _submit(db, org)
    with db.session() as s:
        o = s.get(Organization, org.id)
        assert o is not None
        o.queued, o.running = 57, 3
    with db.session() as s:
        fixed = sweep.reconcile_counters(s)
    assert fixed == {org.id: (2, 0)}
    assert (_org(db, org.id).queued, _org(db, org.id).running) == (2, 0)
    with db.session() as s:
        assert sweep.reconcile_counters(s) == {}


def test_a_run_longer_than_its_lease_keeps_both_leases_alive(db: Database, org: Org, fake_redis) -> None:
    from app.dispatch import Dispatch, Dispatcher, DispatchSettings
    from app.dispatch.keys import LEASES
    from tests.conftest import RecordingPublisher

    d = Dispatcher(fake_redis, DispatchSettings(release_lease_seconds=300))
    registry = Registry.from_entry_points()
    seen: dict[str, list] = {"sql": [], "redis": []}

    def slow(_input, ctx: TaskContext):
        # Sample both leases while the run lasts three lease lengths.
        for _ in range(12):
            time.sleep(0.1)
            seen["sql"].append(_task(db, ctx.task_id).lease_expires_at)
            seen["redis"].append(fake_redis.zscore(LEASES, ctx.task_id))
        return "done"

    registry.add(TaskType(name="slow", cost=1, description="slow", handler=slow))
    with db.session() as s:
        task_id = submission.submit(
            s, org.id, submission.SubmitRequest(type="slow"), registry=registry
        ).task.id
    d.enqueue(org.id, task_id, 10)
    assert d.step() == [task_id]
    settings = run.RunSettings(lease_seconds=0.3, max_attempts=3, allow_private_targets=False)
    outcome = run.execute(db, registry, settings, task_id, Dispatch(lambda: d, RecordingPublisher()))
    assert outcome.recorded and outcome.status == "succeeded"
    assert fake_redis.zscore(LEASES, task_id) is None  # the run's end freed its slot
    assert len(set(seen["sql"])) >= 3  # renewed every lease / 3, not only at the claim
    assert seen["sql"][-1] > utcnow() - timedelta(seconds=0.3)  # never lapsed
    # Redis: switched at once from the 300 s release lease to the run's, then renewed.
    assert max(seen["redis"]) < (time.time() + 5) * 1000
    assert len(set(seen["redis"])) >= 3
