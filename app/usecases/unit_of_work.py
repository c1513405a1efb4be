"""One transaction, and the effects that must follow its commit.

Every use case runs its writes in a :class:`UnitOfWork` and registers what
must happen outside the database -- enqueue, publish a webhook, free a slot,
revoke, wake waiting requests -- with :meth:`UnitOfWork.after_commit`. The
effects run in order once the commit has succeeded, and never after a
rollback: a worker can never race a row that was not committed, and a
failed request leaves nothing behind in Redis or the broker (the model is
pypi/warehouse's after-commit hooks). An effect that fails is logged and the
next one still runs: each is best effort, with the sweep behind it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

from sqlalchemy.orm import Session, SessionTransaction

from app.db import Database

log = logging.getLogger("waybill.usecases")


class UnitOfWork:
    session: Session

    def __init__(self, db: Database) -> None:
        self._db = db
        self._effects: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._transaction: SessionTransaction | None = None

    def after_commit(self, effect: Callable[..., Any], *args: Any) -> None:
        """Run ``effect(*args)`` once this unit has committed; dropped if it rolls back."""
        self._effects.append((effect, args))

    def __enter__(self) -> UnitOfWork:
        self.session = self._db.sessionmaker()
        self._transaction = self.session.begin()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._transaction is not None
        try:
            if exc_type is None:
                self._transaction.commit()  # raises if the commit fails: no effect then
            else:
                self._transaction.rollback()
        finally:
            self.session.close()
        if exc_type is not None:
            return
        effects, self._effects = self._effects, []
        for effect, args in effects:
            try:
                effect(*args)
            except Exception:
                log.exception(
                    "effect after commit failed",
                    extra={"event": "effect.failed", "error": getattr(effect, "__qualname__", repr(effect))},
                )
