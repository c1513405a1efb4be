"""Engine and session factory; SQLite gets WAL and a busy timeout."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from config import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets pollers read while a worker writes; the busy timeout makes
    # concurrent writers wait for the lock instead of failing at once.
    # pysqlite's own transaction handling is switched off so that ours
    # (BEGIN IMMEDIATE, below) is the only one; SQLAlchemy documents this recipe.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class _SQLiteWriters:
    """Write transactions on one SQLite file queue for it here, one at a time, not in SQLite.

    SQLite has one write lock per database file, and a writer that finds it
    taken sleeps in SQLite's busy handler with growing pauses (1, 2, 5, 10 ...
    up to 100 ms) before it looks again, whether or not the lock was freed
    meanwhile. With a web process's 16 threads all writing, a Celery worker's
    claim found the lock taken nearly every time it looked, slept, and lost
    it again: while 16 clients submitted, the workers finished about 20 tasks
    a second where they finish 230 alone (``docs/performance.rst``).

    So a writer first takes this process's lock (its threads queue there and
    are woken at once), then an exclusive ``flock`` on a file beside the
    database (``<file>.writers``), which it polls at sub-millisecond to
    millisecond intervals rather than SQLite's: SQLite's own lock is then
    free when ``BEGIN IMMEDIATE`` asks for it, unless a writer outside
    Waybill holds it. Both are let go once the transaction has ended: after
    the dialect's commit or rollback (not at SQLAlchemy's commit event, which
    comes before the ``COMMIT``), after a failed ``BEGIN``, and at the latest
    when the connection goes back to the pool. What cannot be had within
    SQLite's own busy timeout is skipped, and the transaction goes on to
    SQLite's lock as before. A forked process (a Celery pool process) opens
    its own file: a ``flock`` belongs to the open file, which a fork shares.
    """

    def __init__(self, database: str | None) -> None:
        self._path = f"{database}.writers" if database and database != ":memory:" else None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._file: int | None = None
        self._opened = False
        self._holder: Any = None  # the DBAPI connection whose transaction holds both

    def install(self, engine: Engine) -> None:
        dialect = engine.dialect
        commit, rollback = dialect.do_commit, dialect.do_rollback

        def do_commit(dbapi_connection: Any) -> None:
            try:
                commit(dbapi_connection)
            finally:
                self.end(dbapi_connection)

        def do_rollback(dbapi_connection: Any) -> None:
            try:
                rollback(dbapi_connection)
            finally:
                self.end(dbapi_connection)

        # Per engine: create_engine gives each engine its own dialect object.
        dialect.do_commit = do_commit  # type: ignore[method-assign]
        dialect.do_rollback = do_rollback  # type: ignore[method-assign]
        event.listen(engine, "begin", self.begin)
        event.listen(engine, "checkin", lambda dbapi_connection, _record: self.end(dbapi_connection))

    def _this_process(self) -> None:
        if self._pid != os.getpid():  # the first use in a forked child
            self._pid = os.getpid()
            self._lock = threading.Lock()  # a lock held at the fork would stay held in the child
            self._holder = None
            self._file, self._opened = None, False
        if not self._opened:
            self._opened = True
            if self._path is not None:
                with contextlib.suppress(OSError):  # no file, no cross-process queue: SQLite's alone
                    self._file = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _lock_file(self, deadline: float) -> bool:
        if self._file is None:
            return True
        pause = 0.0001
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.001)
            except OSError:
                return False

    def begin(self, conn: Any) -> None:
        self._this_process()
        dbapi_connection = conn.connection.dbapi_connection
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        if self._lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
            if self._lock_file(deadline):
                self._holder = dbapi_connection
            else:
                self._lock.release()
        try:
            # BEGIN IMMEDIATE takes the write lock up front, so two transactions that
            # read then write cannot deadlock on a lock upgrade (SQLITE_BUSY at once).
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            self.end(dbapi_connection)
            raise

    def end(self, dbapi_connection: Any) -> None:
        # The pool hands its own proxy (a _ConnectionFairy) to do_rollback.
        raw = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
        if raw is None or self._holder is not raw:
            return
        self._holder = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
        self._lock.release()


def _sqlite_begin_deferred(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


def make_engine(
    url: str, *, read_only: bool = False, transaction_pooling: bool = False, **kwargs: Any
) -> Engine:
    """An engine; SQLite ``read_only`` engines begin DEFERRED: readers never queue for the write lock.

    ``transaction_pooling`` (PostgreSQL only): the URL is PgBouncer's in
    transaction pooling mode, where consecutive transactions of one client
    connection may run on different server connections. The engine then
    keeps nothing on a server connection beyond its transaction: no
    server-side prepared statements, no SET at connect. Nothing else in
    Waybill keeps session state: no SET outside SET LOCAL, no advisory locks,
    no LISTEN/NOTIFY (waiting requests are woken through Redis), no temporary
    tables, no WITH HOLD cursors; row locks (FOR UPDATE) end with their
    transaction.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            **kwargs,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        if read_only:
            event.listen(engine, "begin", _sqlite_begin_deferred)
        else:
            _SQLiteWriters(database).install(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        # Pinned, whatever the server's default_transaction_isolation: the
        # idempotency race (INSERT waits on the unique index, then the loser
        # reads the winner's row) and the conditional UPDATEs of claims and
        # records rely on READ COMMITTED's fresh snapshot per statement.
        # Under REPEATABLE READ the loser's read cannot see the winner's row.
        #
        # This holds behind PgBouncer in transaction mode too: it is no session
        # state. SQLAlchemy's psycopg dialect (set_isolation_level, run by
        # on_connect) only sets the connection's ``isolation_level``
        # attribute, and psycopg 3 sends no SET for it: every transaction
        # starts with "BEGIN ISOLATION LEVEL READ COMMITTED"
        # (BaseConnection._get_tx_start_command), so each transaction carries
        # its level to whichever server connection runs it. (Read in
        # SQLAlchemy 2.1.9 dialects/postgresql/psycopg.py and psycopg 3.3.9
        # _connection_base.py.)
        kwargs.setdefault("isolation_level", "READ COMMITTED")
        if transaction_pooling:
            # psycopg prepares a statement on the server connection after
            # five executions and then runs it by name. Behind PgBouncer's
            # transaction mode the next transaction may run on another server
            # connection ('prepared statement "_pg3_0" does not exist') or on
            # one where another client prepared that name ('... already
            # exists'). PgBouncer tracks protocol-level prepared statements
            # only from 1.21 (max_prepared_statements); Debian 12 has 1.18.
            # None: never prepare; every execution is planned afresh.
            kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "prepare_threshold": None}
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 11)
    pre_ping = kwargs.pop("pool_pre_ping", None)
    engine = create_engine(url, pool_pre_ping=bool(pre_ping), **kwargs)
    if pre_ping is None:
        _ping_when_idle(engine)
    # Behind transaction pooling the SET would be session state: it stays on
    # whichever server connection ran it, for other clients to inherit, and
    # never reaches the others. Nor is it needed there: without prepared
    # statements there is no plan cache, every statement gets a custom plan.
    if engine.dialect.name == "postgresql" and not transaction_pooling:
        event.listen(engine, "connect", _postgresql_custom_plans)
    return engine


# A pooled connection unused for this long is pinged before it is handed out.
PING_AFTER_IDLE_SECONDS = 5.0


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use only when it sat idle; a busy one goes without.

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout: one more round
    trip per transaction (psycopg's ping is a SELECT 1 in autocommit, so
    PostgreSQL counted it as a commit too: half the 8 commits per task that
    bench/capacity.py measured were pings). What the ping is for is a
    connection that died while it sat in the pool: a database restart, a
    proxy's or firewall's idle timeout. A connection used within the last
    few seconds is as likely alive as the ping's answer would make it; if it
    died meanwhile, its first statement fails as a disconnect, SQLAlchemy
    invalidates the whole pool at once, the web request answers 503 and a
    Celery task retries (``tests/chaos`` restarts PostgreSQL mid-run).
    Raising DisconnectionError makes the pool replace the connection and try
    again (SQLAlchemy's documented custom pessimistic ping).
    """

    def stamp(_dbapi: Any, record: Any, *_: Any) -> None:
        record.info["waybill_used_at"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        used = record.info.get("waybill_used_at")
        if used is not None and time.monotonic() - used < PING_AFTER_IDLE_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError(f"the connection did not answer a ping: {exc!r}") from exc
        if alive is False:
            raise DisconnectionError("the connection did not answer a ping")

    event.listen(engine, "connect", stamp)
    event.listen(engine, "checkin", stamp)
    event.listen(engine, "checkout", checkout)


def _postgresql_custom_plans(dbapi_connection: Any, _record: Any) -> None:
    # psycopg prepares a statement on the server after five executions, and
    # PostgreSQL may then keep a generic plan for it. For `... WHERE id = $1
    # AND status = $2` prepared while the tasks table was small, that plan
    # was an index scan on status filtered by id: every queued task read per
    # statement after a burst of 100,000 submissions, until autovacuum's
    # ANALYZE (docs/performance.rst). Custom plans always pick the primary
    # key; planning these one-table statements costs microseconds. A SET,
    # not a startup option, so that PgBouncer (session pooling) accepts the
    # connection; in transaction pooling make_engine leaves it out.
    dbapi_connection.autocommit = True
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET plan_cache_mode = force_custom_plan")
    dbapi_connection.autocommit = False


class Database:
    """The engine and a session factory, owned by one app or worker process."""

    def __init__(self, url: str, *, transaction_pooling: bool = False, **engine_kwargs: Any) -> None:
        self.url = url
        self.transaction_pooling = transaction_pooling
        self.engine = make_engine(url, transaction_pooling=transaction_pooling, **engine_kwargs)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: a second engine whose transactions begin DEFERRED, for
        # requests that only read (polls, lists, authentication): in WAL mode
        # they then run beside the writer instead of waiting for its lock.
        if self.engine.dialect.name == "sqlite":
            self.read_engine = make_engine(url, read_only=True, **engine_kwargs)
            self.read_sessionmaker = sessionmaker(self.read_engine, expire_on_commit=False)
        elif self.engine.dialect.name == "postgresql":
            # PostgreSQL: reads in autocommit, on the same pool. Under READ
            # COMMITTED every statement takes its own snapshot anyway, so a
            # read-only transaction guarantees nothing more than autocommit
            # does, and it costs two round trips more (psycopg sends BEGIN,
            # then COMMIT): authentication went from three round trips to
            # one (docs/performance.rst). psycopg switches autocommit on the
            # client only; the pool sets it at checkout and resets it at
            # checkin, so the write sessions never see it.
            self.read_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
            self.read_sessionmaker = sessionmaker(self.read_engine, expire_on_commit=False)
        else:
            self.read_engine = self.engine
            self.read_sessionmaker = self.sessionmaker

    @classmethod
    def from_settings(cls, settings: Settings, **engine_kwargs: Any) -> Database:
        """The database of ``settings``: its URL, and on PostgreSQL its pool bounds and pooling mode.

        The pool bounds each process (a web process, a Celery pool process) to
        ``database_pool_size + database_max_overflow`` connections. SQLite
        keeps SQLAlchemy's own pool: one file, no server to protect.
        """
        url = settings.resolved_database_url()
        if make_url(url).get_backend_name() == "postgresql":
            engine_kwargs.setdefault("pool_size", settings.database_pool_size)
            engine_kwargs.setdefault("max_overflow", settings.database_max_overflow)
            engine_kwargs.setdefault("transaction_pooling", settings.database_transaction_pooling)
        return cls(url, **engine_kwargs)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with self.sessionmaker() as session, session.begin():
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session for reads only; never write through it."""
        with self.read_sessionmaker() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        if self.read_engine.pool is not self.engine.pool:
            self.read_engine.dispose()


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE or DELETE (``execute`` is typed as returning a plain Result)."""
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def is_transient(exc: BaseException) -> bool:
    """A database away or busy (restart, failover, lock timeout): retry; the data is not at fault."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
