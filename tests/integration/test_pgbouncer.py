"""Waybill behind a real PgBouncer in transaction pooling mode (``DATABASE_TRANSACTION_POOLING=1``).

gunicorn, two Celery workers and beat reach a fresh database of this test's
own only through PgBouncer (``/usr/sbin/pgbouncer``, Debian's ``pgbouncer``
package), whose pool has far fewer server connections than Waybill opens
client connections, so consecutive transactions of one client connection
run on different server connections. A second test shows that this setting
is what makes it work: with psycopg's default prepared statements the same
PgBouncer breaks queries.

Skipped when ``DATABASE_URL`` is not PostgreSQL (nothing to pool); failed,
not skipped, when it is and PgBouncer is not installed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.db import Database
from app.embedded_redis import free_port
from tests.support import Api, Receiver, Stack, wait_for
from tests.support.databases import fresh_postgresql
from tests.support.orgs import ledger_sum

pytestmark = pytest.mark.integration

PGBOUNCER = Path("/usr/sbin/pgbouncer")
# Server connections per database and user: far fewer than the client
# connections of the processes below, so PgBouncer really multiplexes.
SERVER_POOL = 4
FINAL = {"succeeded", "failed", "canceled"}


@pytest.fixture
def migrated(database_url: str) -> Iterator[str]:
    """conftest's ``migrated``, overridden: a fresh database on ``DATABASE_URL``'s server, migrated.

    ``make_stack`` (and its ``Stack.db``) then use this database as they
    would the shared one; it is dropped at the end of the test.
    """
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        pytest.skip("DATABASE_URL is not PostgreSQL: there is nothing for PgBouncer to pool")
    # Migrated directly, not through PgBouncer: migrations are run that way
    # (one transaction of DDL, by one process).
    with fresh_postgresql(database_url, "waybill_pgbouncer") as fresh:
        yield fresh


@pytest.fixture
def bouncer_dir(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A directory for PgBouncer's files, and the options that let it run as this test's user.

    PgBouncer refuses to run as root; ``-u nobody`` makes it switch user, but
    before it opens its log and pid files, which must then be reachable by
    nobody. pytest's ``tmp_path`` is not (its base directory is 0700), so
    under root the files go to a directory of nobody's, removed at the end.
    """
    if os.geteuid() != 0:
        directory = tmp_path / "pgbouncer"
        directory.mkdir()
        yield directory, []
        return
    nobody = pwd.getpwnam("nobody")
    directory = Path(tempfile.mkdtemp(prefix="waybill-pgbouncer-"))
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    try:
        yield directory, ["-u", "nobody"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class Bouncer:
    port: int
    user: str
    database: str
    url: str  # the pooled database, as DATABASE_URL

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW what`` on the admin console; its rows for this test's database when they name one."""
        # The console speaks the simple protocol only: nothing may be prepared.
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            dbname="pgbouncer",
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=5,
            row_factory=dict_row,
        ) as conn:
            rows = conn.execute(f"SHOW {what}").fetchall()
        return [r for r in rows if r.get("database", self.database) == self.database]


def start_pgbouncer(
    stack: Stack, port: int, database_url: str, directory: Path, options: list[str]
) -> Bouncer:
    """PgBouncer in transaction mode on 127.0.0.1:``port`` for ``database_url``, a process of ``stack``."""
    if not PGBOUNCER.exists():
        pytest.fail(
            f"{PGBOUNCER} is missing: this test runs Waybill behind a real PgBouncer; "
            "install it with `apt-get install pgbouncer`"
        )
    server = make_url(database_url)
    user = server.username or "postgres"
    name = server.database or "postgres"
    target = f"host={server.host or '127.0.0.1'} port={server.port or 5432} dbname={name}"
    if server.password:
        target += f" user={user} password={server.password}"
    (directory / "users.txt").write_text(f'"{user}" ""\n')
    config = directory / "pgbouncer.ini"
    config.write_text(
        f"""[databases]
{name} = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "users.txt"}
admin_users = {user}
pool_mode = transaction
default_pool_size = {SERVER_POOL}
max_client_conn = 200
pidfile = {directory / "pgbouncer.pid"}
logfile = {directory / "pgbouncer.log"}
"""
    )
    proc = stack.start("pgbouncer", [str(PGBOUNCER), *options, str(config)])
    bouncer = Bouncer(port, user, name, server.set(host="127.0.0.1", port=port).render_as_string(False))

    def answers() -> bool:
        try:
            bouncer.show("VERSION")
        except psycopg.OperationalError:
            return not proc.alive()
        return True

    wait_for(answers, 30, "pgbouncer to accept connections")
    if not proc.alive():
        pytest.fail(f"pgbouncer exited with {proc.process.returncode}:\n{proc.output()[-3000:]}")
    return bouncer


@dataclass
class Peak:
    """The most client and server connections of the pooled database seen at once."""

    clients: int = 0
    servers: int = 0


def sample_pools(bouncer: Bouncer, stop: threading.Event, peak: Peak) -> None:
    for _ in range(3000):  # 0.1 s apart: at most five minutes
        for row in bouncer.show("POOLS"):
            peak.clients = max(peak.clients, row["cl_active"] + row["cl_waiting"])
            peak.servers = max(
                peak.servers,
                sum(row[k] for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")),
            )
        if stop.wait(0.1):
            return


def wait_delivered(api: Api, task_id: str) -> None:
    wait_for(lambda: api.get(task_id)["webhook"]["status"] == "delivered", 30, f"{task_id}'s webhook")


def settled(api: Api) -> dict[str, Any]:
    """The organization's view once nothing of it is queued or running."""

    def view() -> dict[str, Any] | None:
        v: dict[str, Any] = api.http.get(api.base_url + "/v1/organization", timeout=30).json()
        return v if v["queued"] == v["running"] == 0 else None

    return dict(wait_for(view, 30, f"{api.org.id}'s counters to settle"))


def test_core_flow_through_pgbouncer_in_transaction_mode(
    make_stack: Callable[..., Stack],
    migrated: str,
    bouncer_dir: tuple[Path, list[str]],
    receiver: Receiver,
) -> None:
    port = free_port()
    stack = make_stack(
        DATABASE_URL=make_url(migrated).set(host="127.0.0.1", port=port).render_as_string(False),
        DATABASE_TRANSACTION_POOLING="1",
        # Per process: a web process's 8 threads hold at most one connection each.
        DATABASE_POOL_SIZE="3",
        DATABASE_MAX_OVERFLOW="5",
    )
    bouncer = start_pgbouncer(stack, port, migrated, *bouncer_dir)
    assert stack.env["DATABASE_URL"] == bouncer.url
    stack.web(workers=2, threads=8)
    stack.worker(concurrency=4)
    stack.webhooks_worker()
    stack.beat()
    orgs = [stack.org("acme", credits=1000), stack.org("globex", credits=1000)]

    # 60 tasks over the two organizations from 16 threads: every third with a
    # webhook, every fifth idempotent and submitted twice at once.
    jobs: list[tuple[int, dict[str, Any], int]] = []  # (org, body, submissions)
    for i in range(60):
        body: dict[str, Any] = (
            {"type": "sleep", "input": {"seconds": 0.1}}
            if i % 4 == 1
            else {"type": "echo", "input": {"i": i}}
        )
        if i % 3 == 0:
            body["webhook"] = {"url": f"{receiver.url}/hook/{i}"}
        if i % 5 == 0:
            body["idempotencyKey"] = f"key-{i}"
        jobs.append((i % 2, body, 2 if i % 5 == 0 else 1))

    def submit(org: int, body: dict[str, Any]) -> tuple[int, str]:
        r = Api(stack.base_url, orgs[org]).submit(body)
        return r.status_code, (r.json() or {}).get("taskId", r.text)

    stop, peak = threading.Event(), Peak()
    sampler = threading.Thread(target=sample_pools, args=(bouncer, stop, peak), daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [[pool.submit(submit, org, body) for _ in range(n)] for org, body, n in jobs]
            answers = [[f.result(60) for f in group] for group in futures]
        # One more, canceled at once: canceled whether a worker took it already or not.
        api_a = Api(stack.base_url, orgs[0])
        r = api_a.submit({"type": "sleep", "input": {"seconds": 3}, "webhook": {"url": receiver.url + "/c"}})
        assert r.status_code == 202, r.text
        canceled_id = r.json()["taskId"]
        r = api_a.http.post(f"{stack.base_url}/v1/tasks/{canceled_id}/cancel", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "canceled", r.text

        task_ids: list[tuple[int, str]] = []
        for (org, _, n), got in zip(jobs, answers, strict=True):
            if n == 1:
                assert got[0][0] == 202, got
            else:  # the race of two identical submissions: one task, one replay
                assert sorted(status for status, _ in got) == [200, 202], got
                assert got[0][1] == got[1][1], got
            task_ids.append((org, got[0][1]))
        done = {tid: Api(stack.base_url, orgs[org]).wait_status(tid, FINAL, 90) for org, tid in task_ids}
    finally:
        stop.set()
        sampler.join(10)

    assert {t["status"] for t in done.values()} == {"succeeded"}, [
        (tid, t["status"], t.get("error")) for tid, t in done.items() if t["status"] != "succeeded"
    ]
    assert api_a.wait_status(canceled_id, FINAL, 30)["status"] == "canceled"

    # Every webhook arrived (the canceled task's event too) and was recorded as delivered.
    hooked = [
        (org, tid) for (org, tid), (_, body, _) in zip(task_ids, jobs, strict=True) if "webhook" in body
    ]
    hooked.append((0, canceled_id))
    for org, tid in hooked:
        assert receiver.wait_for_task(tid, 60) is not None, f"no webhook for {tid}"
        wait_delivered(Api(stack.base_url, orgs[org]), tid)
    assert receiver.task_count() == len(hooked) == 21

    # Credits: one per task run (echo and sleep cost 1), the canceled one refunded; the ledger agrees.
    for n, organization in enumerate(orgs):
        charged = sum(1 for o, _ in task_ids if o == n)
        view = settled(Api(stack.base_url, organization))
        assert view["credits"] == 1000 - charged == ledger_sum(stack.db, organization.id)

    # PgBouncer pooled it in transaction mode, with fewer server connections than clients.
    (pools,) = bouncer.show("POOLS")
    assert pools["pool_mode"] == "transaction"
    (stats,) = bouncer.show("STATS")
    assert stats["total_xact_count"] > 2 * len(task_ids)
    assert peak.servers <= SERVER_POOL < peak.clients, peak
    # And no process ever saw a prepared-statement error.
    for proc in stack.procs:
        assert "prepared statement" not in proc.output(), proc.name


def run_the_same_select(db: Database, clients: int = 8, times: int = 20) -> list[BaseException]:
    """``clients`` connections, each running one SELECT ``times`` times, one transaction each: what failed."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients, timeout=30)
    statement = text("SELECT count(*) FROM tasks WHERE status = :status")

    def client() -> None:
        barrier.wait()
        for _ in range(times):
            try:
                with db.engine.begin() as conn:
                    conn.execute(statement, {"status": "queued"}).scalar_one()
            except DBAPIError as exc:
                errors.append(exc.orig or exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_prepared_statements_break_behind_transaction_pooling_unless_turned_off(
    make_stack: Callable[..., Stack], migrated: str, bouncer_dir: tuple[Path, list[str]]
) -> None:
    port = free_port()
    bouncer = start_pgbouncer(make_stack(), port, migrated, *bouncer_dir)
    prepared_statement_errors = (
        psycopg.errors.InvalidSqlStatementName,
        psycopg.errors.DuplicatePreparedStatement,
    )

    # psycopg's default: prepared after five executions, then run by name on
    # whichever server connection PgBouncer picks ("does not exist"), or
    # prepared where another client's statement has the name ("already exists").
    prepared = Database(bouncer.url, pool_size=8, max_overflow=0)
    try:
        for _ in range(5):  # bounded: one round has always been enough
            errors = run_the_same_select(prepared)
            if errors:
                break
    finally:
        prepared.dispose()
    assert errors, "psycopg's prepared statements worked behind PgBouncer's transaction mode"
    assert all(isinstance(e, prepared_statement_errors) for e in errors), errors

    # The same through the same PgBouncer (its server connections now holding
    # those prepared statements), with transaction pooling on: nothing fails.
    pooled = Database(bouncer.url, transaction_pooling=True, pool_size=8, max_overflow=0)
    try:
        assert run_the_same_select(pooled) == []
    finally:
        pooled.dispose()
