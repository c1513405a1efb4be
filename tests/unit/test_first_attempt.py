"""FirstAttempts: a bounded pool of threads for first attempts, and the run that hands them on."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import fakeredis

from app.db import Database
from app.dispatch import Dispatch, Dispatcher
from app.models import WebhookDelivery
from app.services import submission
from app.services.task_types import Registry
from app.usecases import run
from app.usecases.first_attempt import FirstAttempts
from tests.conftest import RecordingPublisher
from tests.support import Org


def _idle(attempts: FirstAttempts) -> bool:
    for _ in range(100):
        if attempts.busy == 0:
            return True
        threading.Event().wait(0.05)
    return False


def test_reservations_beyond_the_threads_are_refused_and_every_end_gives_the_thread_back() -> None:
    release = threading.Event()
    sent: list[str] = []

    def send(plan: SimpleNamespace) -> None:
        sent.append(plan.delivery_id)
        release.wait(5)
        if plan.delivery_id == "boom":
            raise RuntimeError("database away")

    attempts = FirstAttempts(send, threads=2)
    assert attempts.reserve() and attempts.reserve()
    assert not attempts.reserve()  # both held: the caller publishes to the webhooks queue instead
    attempts.start(SimpleNamespace(delivery_id="boom"))
    attempts.release()  # the second had nothing to send (rolled back)
    assert attempts.busy == 1 and attempts.reserve()
    attempts.start(SimpleNamespace(delivery_id="b"))
    release.set()
    assert _idle(attempts) and sorted(sent) == ["b", "boom"]  # a raising send gave its thread back too


def test_no_threads_means_every_attempt_goes_through_the_queue() -> None:
    assert not FirstAttempts(lambda _plan: None, threads=0).reserve()


class _Threads:
    def __init__(self, free: bool) -> None:
        self.free, self.released = free, 0
        self.started: list[Any] = []

    def reserve(self) -> bool:
        return self.free

    def start(self, plan: Any) -> None:
        self.started.append(plan)

    def release(self) -> None:
        self.released += 1


def _run_one(db: Database, org: Org, publisher: RecordingPublisher, threads: _Threads) -> str:
    registry = Registry.from_entry_points()
    with db.session() as s:
        task = submission.submit(
            s,
            org.id,
            submission.SubmitRequest(type="echo", input={"a": 1}, webhook_url="http://127.0.0.1:9/h"),
            registry=registry,
        ).task
    dispatch = Dispatch(lambda: Dispatcher(fakeredis.FakeRedis(server=fakeredis.FakeServer())), publisher)
    settings = run.RunSettings(lease_seconds=60, max_attempts=3, allow_private_targets=True)
    outcome = run.execute(db, registry, settings, task.id, dispatch, threads)
    assert outcome.recorded and outcome.delivery_id
    return outcome.delivery_id


def test_with_a_thread_the_first_attempt_is_claimed_with_the_result_and_not_published(
    db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    threads = _Threads(free=True)
    delivery_id = _run_one(db, org, publisher, threads)
    assert [(p.delivery_id, p.attempt) for p in threads.started] == [(delivery_id, 1)]
    assert publisher.deliveries == []  # no second hop
    with db.session() as s:
        delivery = s.get(WebhookDelivery, delivery_id)
        assert delivery is not None and delivery.claimed_until is not None  # claimed in the record's commit
        assert delivery.status == "pending" and delivery.attempts == 0


def test_with_every_thread_busy_the_first_attempt_goes_to_the_webhooks_queue(
    db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    threads = _Threads(free=False)
    delivery_id = _run_one(db, org, publisher, threads)
    assert threads.started == [] and publisher.deliveries == [(delivery_id, None)]
    with db.session() as s:
        delivery = s.get(WebhookDelivery, delivery_id)
        assert delivery is not None and delivery.claimed_until is None  # any webhooks worker may claim it
