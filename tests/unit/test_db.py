"""Engine settings that matter for correctness or speed on each database."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.db import Database


def test_postgresql_connections_never_keep_a_generic_plan(db: Database) -> None:
    if db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no plan cache")
    for _ in range(3):  # every pooled connection, not only the first
        with db.session() as s:
            assert s.execute(text("SHOW plan_cache_mode")).scalar_one() == "force_custom_plan"
            s.execute(text("SELECT 1"))


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(db: Database) -> None:
    if db.engine.dialect.name != "sqlite":
        pytest.skip("SQLite only")
    with db.session() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert s.execute(text("PRAGMA busy_timeout")).scalar_one() == 30_000
