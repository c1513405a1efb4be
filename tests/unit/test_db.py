"""Engine settings that matter for correctness or speed on each database."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app.db import Database, _SQLiteWriters


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


def _sqlite_db(tmp_path: object) -> Database:
    return Database(f"sqlite:///{tmp_path}/writers.sqlite3")


def _writers_lock(database: Database) -> Any:
    """The engine's queue of writers, found through its begin listener."""
    for fn in database.engine.dispatch.begin:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, _SQLiteWriters):
            return owner._lock
    raise AssertionError("no writer queue on this engine")


def test_sqlite_write_transactions_queue_in_the_process_and_let_go_however_they_end(tmp_path: object) -> None:
    database = _sqlite_db(tmp_path)
    lock = _writers_lock(database)
    with database.session() as s:
        s.execute(text("CREATE TABLE t (v INTEGER)"))
        assert lock.locked()  # held from BEGIN IMMEDIATE ...
    assert not lock.locked()  # ... to the commit

    with pytest.raises(RuntimeError), database.session() as s:
        s.execute(text("INSERT INTO t VALUES (1)"))
        raise RuntimeError("rolled back")
    assert not lock.locked()

    conn = database.engine.connect()
    conn.execute(text("INSERT INTO t VALUES (2)"))
    assert lock.locked()
    conn.close()  # never committed: the pool's reset rolls back
    assert not lock.locked()

    # Reads on the read engine never take it.
    with database.read_session() as s:
        assert s.execute(text("SELECT count(*) FROM t")).scalar_one() == 0
        assert not lock.locked()

    # A second writer waits for the first in the queue, not in SQLite's busy handler.
    order: list[str] = []
    first_in = threading.Event()

    def second() -> None:
        first_in.wait(5)
        with database.session() as s:
            s.execute(text("INSERT INTO t VALUES (3)"))  # the session begins here
            order.append("second")

    t = threading.Thread(target=second)
    t.start()
    with database.session() as s:
        s.execute(text("INSERT INTO t VALUES (4)"))
        first_in.set()
        time.sleep(0.2)  # the second thread is queued meanwhile
        order.append("first")
    t.join(10)
    assert order == ["first", "second"]
    with database.read_session() as s:
        assert s.execute(text("SELECT count(*) FROM t")).scalar_one() == 2
    database.dispose()


def test_sqlite_writer_queue_lets_go_when_begin_fails(tmp_path: object) -> None:
    database = _sqlite_db(tmp_path)
    lock = _writers_lock(database)
    with database.session() as s:
        s.execute(text("SELECT 1"))  # the file exists, in WAL mode
    with database.engine.connect() as conn:  # the pooled connection gives up after 50 ms
        conn.connection.dbapi_connection.execute("PRAGMA busy_timeout=50")  # type: ignore[union-attr]
    other = sqlite3.connect(f"{tmp_path}/writers.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock
    with pytest.raises(OperationalError), database.session() as s:
        s.execute(text("SELECT 1"))
    assert not lock.locked()
    other.execute("ROLLBACK")
    other.close()
    database.dispose()


def test_sqlite_writers_of_other_processes_queue_on_the_file_beside_the_database(tmp_path: object) -> None:
    database = _sqlite_db(tmp_path)
    with database.session() as s:
        s.execute(text("CREATE TABLE t (v INTEGER)"))
    # Another process's writer: its own open file, so its own flock.
    other = os.open(f"{tmp_path}/writers.sqlite3.writers", os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX)
    threading.Timer(0.3, fcntl.flock, (other, fcntl.LOCK_UN)).start()
    started = time.monotonic()
    with database.session() as s:
        s.execute(text("INSERT INTO t VALUES (1)"))
        waited = time.monotonic() - started
        # Held now by this writer: the other process would wait in turn.
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert waited >= 0.25
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go after the commit
    os.close(other)
    database.dispose()
