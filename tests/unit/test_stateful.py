"""Property-based, stateful: any sequence of submit / run / fail / cancel / redeliver / refund
keeps the books and the counters exact."""

from __future__ import annotations

from datetime import timedelta

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from sqlalchemy import func, select

from app.db import Database
from app.models import CreditEntry, Organization, Task, WebhookAttempt, WebhookDelivery
from app.models.base import utcnow
from app.services import deliveries, lifecycle, organizations, submission
from app.services.deliveries import AttemptOutcome
from app.services.errors import InsufficientCredits, QueueFull, ServiceError
from app.services.task_types import Registry
from tests.support import empty_tables

REG = Registry.from_entry_points()


def run_machine(db: Database) -> None:
    class Books(RuleBasedStateMachine):
        @initialize(credits=st.integers(0, 12), queue_limit=st.integers(1, 8))
        def start(self, credits: int, queue_limit: int) -> None:
            empty_tables(db)
            with db.session() as s:
                self.org_id = organizations.create_organization(
                    s, "p", credits=credits, queue_limit=queue_limit, concurrency_limit=5
                ).organization.id
            self.clock = utcnow()
            self.keys: dict[str, str] = {}

        def _ids(self, *statuses: str) -> list[str]:
            with db.session() as s:
                q = select(Task.id).where(Task.organization_id == self.org_id)
                if statuses:
                    q = q.where(Task.status.in_(statuses))
                return list(s.execute(q.order_by(Task.id)).scalars())

        @rule(
            kind=st.sampled_from(["echo", "sleep"]),
            key=st.one_of(st.none(), st.sampled_from(["k1", "k2"])),
            webhook=st.booleans(),
            value=st.integers(0, 2),
        )
        def submit(self, kind: str, key: str | None, webhook: bool, value: int) -> None:
            body = {"seconds": 0} if kind == "sleep" else value
            req = submission.SubmitRequest(
                type=kind,
                input=body,
                idempotency_key=key,
                webhook_url="https://h.example/" if webhook else None,
            )
            try:
                with db.session() as s:
                    out = submission.submit(s, self.org_id, req, registry=REG)
                    task_id = out.task.id
            except (InsufficientCredits, QueueFull):
                return
            except ServiceError as exc:  # the same key with a different request
                assert exc.status == 422 and key in self.keys
                return
            if key is not None:
                assert self.keys.setdefault(key, task_id) == task_id

        @rule(data=st.data(), fail=st.booleans(), twice=st.booleans())
        def run(self, data: st.DataObject, fail: bool, twice: bool) -> None:
            waiting = self._ids("queued")
            if not waiting:
                return
            task_id = data.draw(st.sampled_from(waiting))
            with db.session() as s:
                claim = lifecycle.claim(s, task_id, lease_seconds=30, max_attempts=3, now=self.clock)
            assert claim.task is not None
            for _ in range(2 if twice else 1):  # a duplicate outcome changes nothing
                with db.session() as s:
                    lifecycle.record_result(
                        s,
                        task_id,
                        claim.attempt,
                        result=None if fail else {"ok": 1},
                        error=("boom", "x") if fail else None,
                    )

        @rule(data=st.data())
        def worker_dies(self, data: st.DataObject) -> None:
            live = self._ids("queued", "running")
            if not live:
                return
            task_id = data.draw(st.sampled_from(live))
            with db.session() as s:
                lifecycle.claim(s, task_id, lease_seconds=30, max_attempts=3, now=self.clock)
            self.clock += timedelta(seconds=31)  # its lease expires; the next claim retries or fails it

        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            every = self._ids()
            if not every:
                return
            task_id = data.draw(st.sampled_from(every))
            try:
                with db.session() as s:
                    lifecycle.cancel(s, self.org_id, task_id)
            except ServiceError as exc:
                assert exc.status == 409

        @rule(data=st.data())
        def refund_again(self, data: st.DataObject) -> None:
            every = self._ids()
            if not every:
                return
            task_id = data.draw(st.sampled_from(every))
            with db.session() as s:
                task = s.get(Task, task_id)
                assert task is not None
                if task.status in ("failed", "canceled"):
                    # Ending it again (a racing cancel, a last-resort failure) moves nothing.
                    assert not lifecycle.fail_task(s, task_id, "again", "again").done

        @rule(data=st.data(), delivered=st.booleans())
        def deliver_or_redeliver(self, data: st.DataObject, delivered: bool) -> None:
            with db.session() as s:
                ids = list(s.execute(select(WebhookDelivery.id)).scalars())
            if not ids:
                return
            delivery_id = data.draw(st.sampled_from(ids))
            with db.session() as s:
                plan = deliveries.claim_attempt(
                    s, delivery_id, hold_seconds=0, now=utcnow() + timedelta(days=1)
                )
            if plan is None:
                with db.session() as s:
                    d = s.get(WebhookDelivery, delivery_id)
                    task = s.get(Task, d.task_id) if d else None
                    if task is not None:
                        deliveries.redeliver(s, task)
                return
            outcome = AttemptOutcome(
                "delivered" if delivered else "http_error", 200 if delivered else 500, 1, None
            )
            with db.session() as s:
                deliveries.record_attempt(
                    s, plan, outcome, retry_base_seconds=0, now=utcnow() + timedelta(days=1)
                )

        @invariant()
        def books_balance(self) -> None:
            with db.session() as s:
                org = s.get(Organization, self.org_id)
                assert org is not None
                ledger = s.execute(
                    select(func.coalesce(func.sum(CreditEntry.amount), 0)).where(
                        CreditEntry.organization_id == self.org_id
                    )
                ).scalar_one()
                assert org.credits == ledger >= 0
                rows = s.execute(select(Task).where(Task.organization_id == self.org_id)).scalars().all()
                for t in rows:
                    kinds = (
                        s.execute(select(CreditEntry.kind).where(CreditEntry.task_id == t.id)).scalars().all()
                    )
                    assert kinds.count("reserve") == 1
                    assert kinds.count("refund") == (1 if t.status in ("failed", "canceled") else 0), (
                        t.status,
                        kinds,
                    )
                    if t.status == "succeeded":
                        assert t.result == {"ok": 1} and t.completed_at is not None
                    if t.status in ("failed", "canceled"):
                        assert t.result is None and t.completed_at is not None
                assert org.queued == sum(t.status == "queued" for t in rows) <= org.queue_limit
                assert org.running == sum(t.status == "running" for t in rows)

        @invariant()
        def deliveries_are_consistent(self) -> None:
            with db.session() as s:
                for d in s.execute(select(WebhookDelivery)).scalars():
                    numbers = sorted(
                        s.execute(
                            select(WebhookAttempt.attempt).where(WebhookAttempt.delivery_id == d.id)
                        ).scalars()
                    )
                    assert numbers == list(range(1, d.attempts + 1))
                    assert d.attempts <= d.max_attempts
                    if d.status == "delivered":
                        assert d.delivered_at is not None
                    task = s.get(Task, d.task_id)
                    assert task is not None and task.webhook_status == d.status
                    assert d.event_type == f"task.{task.status}"

    run_state_machine_as_test(
        Books,
        settings=settings(
            max_examples=30,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        ),
    )


def test_books_and_counters_stay_exact_under_any_sequence(db: Database) -> None:
    run_machine(db)
