"""Pool bounds per process and PgBouncer's transaction pooling, from the settings to the engine.

The settings reach the engine through ``Database.from_settings``, which the
app (``create_app``) and the CLI both use. What the engine would pass to
psycopg is read at its ``do_connect`` event, so these run without a server;
one test checks on a real PostgreSQL what a connection then does (and does
not do) on the server, and is skipped only when none is reachable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import psycopg
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

from app import create_app
from app.cli import PG_CONNECT_TIMEOUT_SECONDS, _db
from app.db import Database, _postgresql_custom_plans
from config import Settings

# Nothing listens on port 1: these engines are never meant to connect.
UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/waybill"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class _Connecting(Exception):
    """Raised at ``do_connect`` with what the engine would pass to psycopg.connect."""

    def __init__(self, cparams: dict[str, Any]) -> None:
        super().__init__("connect intercepted")
        self.cparams = cparams


def connect_params(engine: Engine) -> dict[str, Any]:
    """The keyword arguments the engine gives psycopg.connect, without connecting."""

    def intercept(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        raise _Connecting(dict(cparams))

    event.listen(engine, "do_connect", intercept)
    try:
        with pytest.raises(_Connecting) as caught:
            engine.connect()
    finally:
        event.remove(engine, "do_connect", intercept)
    return caught.value.cparams


def pool_bounds(engine: Engine) -> tuple[int, int]:
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    return pool.size(), pool._max_overflow


def test_the_app_database_takes_its_pool_bounds_from_the_environment(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": UNREACHABLE_PG,
            "DATABASE_POOL_SIZE": "3",
            "DATABASE_MAX_OVERFLOW": "7",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "VAR_DIR": str(tmp_path),
        }
    )
    app = create_app(settings, redis_client=fakeredis.FakeRedis())
    db = app.extensions["waybill"].db
    try:
        assert pool_bounds(db.engine) == (3, 7)
        assert not db.transaction_pooling
        # Session pooling or no PgBouncer: psycopg's default threshold, and the SET.
        assert "prepare_threshold" not in connect_params(db.engine)
        assert event.contains(db.engine, "connect", _postgresql_custom_plans)
    finally:
        db.dispose()


def test_transaction_pooling_turns_prepared_statements_and_the_set_off() -> None:
    settings = Settings.from_env({"DATABASE_URL": UNREACHABLE_PG, "DATABASE_TRANSACTION_POOLING": "1"})
    db = Database.from_settings(settings)
    try:
        assert db.transaction_pooling
        assert pool_bounds(db.engine) == (5, 11)  # the settings' defaults
        assert connect_params(db.engine)["prepare_threshold"] is None
        assert not event.contains(db.engine, "connect", _postgresql_custom_plans)
    finally:
        db.dispose()


def test_the_cli_database_keeps_its_connect_timeout_beside_the_pooling_settings() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": UNREACHABLE_PG,
            "DATABASE_POOL_SIZE": "1",
            "DATABASE_MAX_OVERFLOW": "0",
            "DATABASE_TRANSACTION_POOLING": "true",
        }
    )
    db = _db(settings)
    try:
        assert pool_bounds(db.engine) == (1, 0)
        params = connect_params(db.engine)
        assert params["connect_timeout"] == PG_CONNECT_TIMEOUT_SECONDS
        assert params["prepare_threshold"] is None
    finally:
        db.dispose()


def test_sqlite_keeps_sqlalchemys_pool_whatever_the_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'waybill.sqlite3'}"
    plain = Database(url)
    configured = Database.from_settings(
        Settings.from_env(
            {"DATABASE_URL": url, "DATABASE_POOL_SIZE": "1", "DATABASE_MAX_OVERFLOW": "0"},
        )
    )
    try:
        assert pool_bounds(configured.engine) == pool_bounds(plain.engine)
        assert pool_bounds(configured.read_engine) == pool_bounds(plain.read_engine)
    finally:
        plain.dispose()
        configured.dispose()


@pytest.fixture(scope="module")
def postgresql_url() -> Iterator[str]:
    """``DATABASE_URL`` when it is PostgreSQL, else the local test server; skipped when unreachable."""
    env_url = os.environ.get("DATABASE_URL", "")
    url = env_url if env_url.startswith("postgresql") else DEFAULT_PG
    parsed = make_url(url)
    try:
        psycopg.connect(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 5432,
            user=parsed.username or "postgres",
            password=parsed.password or "",
            dbname=parsed.database or "postgres",
            connect_timeout=3,
        ).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL reachable at {parsed.render_as_string(hide_password=True)}: {exc}")
    yield url


PLAN_CACHE_MODE_SOURCE = "SELECT source FROM pg_settings WHERE name = 'plan_cache_mode'"
SERVER_PREPARED = "SELECT count(*) FROM pg_prepared_statements"


@pytest.mark.parametrize("transaction_pooling", [False, True])
def test_on_the_server_transaction_pooling_leaves_no_session_state(
    postgresql_url: str, transaction_pooling: bool
) -> None:
    db = Database.from_settings(
        Settings.from_env(
            {"DATABASE_URL": postgresql_url},
            database_transaction_pooling=transaction_pooling,
        )
    )
    try:
        with db.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert isinstance(raw, psycopg.Connection)
            # Well past psycopg's default threshold of five executions.
            for n in range(10):
                assert conn.execute(text("SELECT CAST(:n AS integer) + 1"), {"n": n}).scalar_one() == n + 1
            prepared = conn.execute(text(SERVER_PREPARED)).scalar_one()
            source = conn.execute(text(PLAN_CACHE_MODE_SOURCE)).scalar_one()
            isolation = conn.execute(text("SHOW transaction_isolation")).scalar_one()
        if transaction_pooling:
            assert raw.prepare_threshold is None
            assert prepared == 0
            assert source != "session"  # no SET plan_cache_mode reached the server
        else:
            # The contrast: the same check sees both when they are there.
            assert raw.prepare_threshold == 5
            assert prepared >= 1
            assert source == "session"
        # Either way, READ COMMITTED, carried by each BEGIN rather than by a SET.
        assert isolation == "read committed"
    finally:
        db.dispose()


def _backend_pid(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(url: str, pid: int) -> None:
    admin = Database(url)
    try:
        with admin.engine.begin() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        admin.dispose()


def test_an_idle_pooled_connection_is_pinged_and_a_dead_one_replaced(
    postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool pings only connections that sat idle; a busy one costs no round trip."""
    db = Database(postgresql_url, pool_size=1, max_overflow=0)
    pings: list[int] = []
    real_ping = db.engine.dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        pings.append(1)
        return bool(real_ping(dbapi_connection))

    monkeypatch.setattr(db.engine.dialect, "do_ping", counting_ping)
    try:
        first = _backend_pid(db)
        for _ in range(5):  # used moments ago: no ping
            assert _backend_pid(db) == first
        assert pings == []
        # The server drops the pooled connection while it sits idle (a restart,
        # an idle timeout): past the idle bound the checkout pings, finds it
        # dead and hands out a new one; the caller never sees the failure.
        _terminate(postgresql_url, first)
        monkeypatch.setattr("app.db.PING_AFTER_IDLE_SECONDS", 0.0)
        assert _backend_pid(db) != first
        assert len(pings) >= 1
    finally:
        db.dispose()


def test_reads_run_in_autocommit_and_leave_writes_transactional(postgresql_url: str) -> None:
    """A read session opens no transaction (no BEGIN, no COMMIT: two round trips fewer).

    One pooled connection serves both kinds in turn: the autocommit of a read
    must not leak into the next write session on that connection.
    """
    db = Database(postgresql_url, pool_size=1, max_overflow=0)
    try:
        for _ in range(2):
            with db.read_session() as s:
                assert s.execute(text("SELECT 1")).scalar_one() == 1
                raw = s.connection().connection.dbapi_connection
                assert isinstance(raw, psycopg.Connection)
                assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            with db.session() as s:
                assert s.execute(text("SELECT 1")).scalar_one() == 1
                raw = s.connection().connection.dbapi_connection
                assert isinstance(raw, psycopg.Connection)
                assert raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    finally:
        db.dispose()
