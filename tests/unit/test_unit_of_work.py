"""The unit of work: effects run only after a successful commit, in order, never after a rollback."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.db import Database
from app.models import Organization
from app.models.base import utcnow
from app.usecases.unit_of_work import UnitOfWork
from tests.support import Org


def _org(org_id: str, name: str = "x") -> Organization:
    return Organization(
        id=org_id,
        name=name,
        credits=0,
        queue_limit=1,
        concurrency_limit=1,
        queued=0,
        running=0,
        webhook_secret="whsec_x",
        created_at=utcnow(),
    )


def _exists(db: Database, org_id: str) -> bool:
    with db.read_session() as s:
        return s.execute(select(Organization.id).where(Organization.id == org_id)).first() is not None


def test_effects_run_after_the_commit_in_order_and_see_its_rows(db: Database) -> None:
    seen: list[tuple[str, bool]] = []
    with UnitOfWork(db) as uow:
        uow.session.add(_org("org_uow_1"))
        uow.after_commit(lambda: seen.append(("first", _exists(db, "org_uow_1"))))
        uow.after_commit(lambda: seen.append(("second", _exists(db, "org_uow_1"))))
        assert seen == []  # nothing runs inside the transaction
    assert seen == [("first", True), ("second", True)]


def test_no_effect_runs_after_a_rollback(db: Database) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError), UnitOfWork(db) as uow:
        uow.session.add(_org("org_uow_2"))
        uow.after_commit(seen.append, "published")
        raise RuntimeError("the use case failed")
    assert seen == [] and not _exists(db, "org_uow_2")


def test_no_effect_runs_when_the_commit_itself_fails(db: Database, org: Org) -> None:
    seen: list[str] = []
    with pytest.raises(IntegrityError), UnitOfWork(db) as uow:
        uow.session.add(_org(org.id))  # a duplicate primary key: fails at the commit's flush
        uow.after_commit(seen.append, "published")
    assert seen == []


def test_a_failing_effect_does_not_stop_the_next(db: Database) -> None:
    seen: list[str] = []

    def broken() -> None:
        raise ConnectionError("broker down")

    with UnitOfWork(db) as uow:
        uow.after_commit(broken)
        uow.after_commit(seen.append, "still sent")
    assert seen == ["still sent"]
