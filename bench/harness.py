"""Start what a benchmark needs on 127.0.0.1, and stop it: Redis, gunicorn, Celery workers.

Every benchmark builds a :class:`Platform` in a temporary directory with its
own embedded Redis and its own database (SQLite there, or a fresh PostgreSQL
database on the server ``BENCH_POSTGRES_URL`` names, by default
``postgres@127.0.0.1:5432``), so a run never touches anything else on the
machine. Every process is in its own process group and is stopped (killed if
it must) when the ``platform()`` block ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, insert, text, update

from app import ids
from app.db import Database
from app.dispatch.keys import CLIMIT, KNOWN, RING, RING_MEMBERS, waiting_key
from app.embedded_redis import EmbeddedRedis, free_port
from app.migrate import upgrade
from app.models import Organization, Task
from app.models.base import utcnow
from app.services import organizations

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DB_KINDS = ("sqlite", "postgresql")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def wait_http(url: str, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s")


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh, migrated database: ``sqlite`` or ``postgresql``."""
    if kind == "sqlite":
        url = f"sqlite:///{workdir / 'bench.sqlite3'}"
        upgrade(url)
        yield url
        return
    admin_url = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    name = f"waybill_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Platform:
    workdir: Path
    database_url: str
    redis: EmbeddedRedis
    env: dict[str, str] = field(default_factory=dict)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    base_url: str = ""
    baseline_url: str = ""
    _engine: Any = None

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115  # owned by the process
        proc = subprocess.Popen(
            argv,
            env={**self.env, **env},
            cwd=ROOT,  # `-A bench.baseline_app` and `app.wsgi` resolve from the repository
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def web(self, workers: int = 2, threads: int = 16) -> None:
        port = free_port()
        self.start(
            "web",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(workers),
                "--threads",
                str(threads),
                "app.wsgi:app",
            ],
        )
        self.base_url = f"http://127.0.0.1:{port}"
        wait_http(self.base_url + "/healthz", "gunicorn")

    def serve(self, workers: int = 2, threads: int = 16) -> subprocess.Popen[bytes]:
        """The web process exactly as the Procfile's ``web: waybill serve`` line runs it.

        ``waybill serve`` execs gunicorn with ``app.gunicorn_conf``; only the
        bind address and the process and thread counts come from here (through
        the settings it reads), so a benchmark measures what a deployment runs.
        """
        port = free_port()
        proc = self.start(
            "web",
            [sys.executable, "-m", "app.cli", "serve"],
            HTTP_HOST="127.0.0.1",
            HTTP_PORT=str(port),
            WEB_CONCURRENCY=str(workers),
            WEB_THREADS=str(threads),
        )
        self.base_url = f"http://127.0.0.1:{port}"
        wait_http(self.base_url + "/healthz", "waybill serve")
        return proc

    def baseline_web(self, workers: int = 2, threads: int = 16) -> subprocess.Popen[bytes]:
        """The bare Flask baseline (``bench/baseline_app.py``) under gunicorn, flags as ``waybill serve``.

        Only ``--config python:app.gunicorn_conf`` is left out: it holds
        Waybill's graceful timeout and metrics hook, nothing that serves faster.
        """
        from bench.baseline_app import create_table

        create_table(self.database_url)
        port = free_port()
        proc = self.start(
            "baseline-web",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(workers),
                "--threads",
                str(threads),
                "bench.baseline_app:create_app()",
            ],
        )
        self.baseline_url = f"http://127.0.0.1:{port}"
        wait_http(self.baseline_url + "/healthz", "the baseline gunicorn")
        return proc

    def worker(
        self,
        name: str = "worker",
        queues: str = "tasks",
        concurrency: int = 2,
        app: str = "workers.main",
        **env: str,
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                app,
                "worker",
                "--queues",
                queues,
                "--concurrency",
                str(concurrency),
                "--hostname",
                f"{name}@%h",
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
            ],
            **env,
        )

    def beat(self) -> subprocess.Popen[bytes]:
        return self.start(
            "beat",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.main",
                "beat",
                "--schedule",
                str(self.workdir / "beat-schedule"),
                "--loglevel",
                "WARNING",
            ],
        )

    def org(self, name: str, **kwargs: Any) -> tuple[str, str]:
        kwargs.setdefault("credits", 10_000_000)
        kwargs.setdefault("queue_limit", 1_000_000)
        kwargs.setdefault("concurrency_limit", 100)
        db = Database(self.database_url)
        with db.session() as s:
            created = organizations.create_organization(s, name, **kwargs)
            out = (created.organization.id, created.key.api_key)
        db.dispose()
        return out

    def fill(
        self,
        org_id: str,
        count: int,
        *,
        task_type: str = "echo",
        webhook_url: str | None = None,
        concurrency_limit: int = 100,
    ) -> float:
        """Put ``count`` waiting tasks in SQL and in the organization's Redis waiting list.

        This leaves what ``count`` submissions would leave (rows ``queued``
        with ``dispatched_at`` set, the ``queued`` counter, the ids in the
        waiting list, the organization in the ring), but in seconds rather than
        minutes, so that processing is measured apart from submission. The Redis
        side mirrors ``Dispatcher.enqueue``'s script, in pipelines.
        """
        import redis

        started = time.monotonic()
        db = Database(self.database_url)
        client = redis.Redis.from_url(self.redis.url)
        batch = 5_000
        for start in range(0, count, batch):
            now = utcnow()
            rows: list[dict[str, Any]] = [
                {
                    "id": ids.task_id(),
                    "organization_id": org_id,
                    "type": task_type,
                    "status": "queued",
                    "input": {"n": start + i},
                    "cost": 1,
                    "refunded": False,
                    "webhook_url": webhook_url,
                    "webhook_status": "none",
                    "webhook_attempts": 0,
                    "attempts": 0,
                    "dispatched_at": now,
                    "created_at": now,
                }
                for i in range(min(batch, count - start))
            ]
            with db.session() as s:
                s.execute(insert(Task), rows)
                s.execute(
                    update(Organization)
                    .where(Organization.id == org_id)
                    .values(queued=Organization.queued + len(rows))
                )
            task_ids: list[str] = [r["id"] for r in rows]
            pipe = client.pipeline(transaction=False)
            pipe.rpush(waiting_key(org_id), *task_ids)
            pipe.sadd(KNOWN, *task_ids)
            pipe.hset(CLIMIT, org_id, concurrency_limit)
            pipe.sadd(RING_MEMBERS, org_id)
            added_to_ring = pipe.execute()[-1]
            if added_to_ring:
                client.rpush(RING, org_id)
        client.close()
        db.dispose()
        return time.monotonic() - started

    def count_status(self, status: str) -> int:
        """Tasks in ``status``, from SQL (the source of truth), in a short connection."""
        engine = self.probe_engine()
        with engine.connect() as conn:
            return int(
                conn.execute(text("SELECT count(*) FROM tasks WHERE status = :s"), {"s": status}).scalar()
                or 0
            )

    def probe_engine(self) -> Any:
        # One small engine for the benchmark's own reads; plain connections, no
        # BEGIN IMMEDIATE, so polling never takes SQLite's write lock.
        if self._engine is None:
            self._engine = create_engine(self.database_url, pool_size=1)
        return self._engine

    def stop_one(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """Stop one process (warm: Celery finishes what it holds), killed if it does not stop in time."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        for _name, proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()


@contextlib.contextmanager
def platform(db_kind: str = "sqlite", **env: str) -> Iterator[Platform]:
    with tempfile.TemporaryDirectory(prefix="waybill-bench-") as tmp:
        workdir = Path(tmp)
        with database(db_kind, workdir) as url:
            redis = EmbeddedRedis(workdir / "redis", persist=False).start()
            metrics_dir = workdir / "metrics"
            metrics_dir.mkdir()
            p = Platform(
                workdir=workdir,
                database_url=url,
                redis=redis,
                env={
                    **os.environ,
                    "DATABASE_URL": url,
                    "REDIS_URL": redis.url,
                    "VAR_DIR": str(workdir / "var"),
                    "WEBHOOK_ALLOW_PRIVATE": "true",
                    "FETCH_ALLOW_PRIVATE": "true",
                    "LOG_LEVEL": "WARNING",
                    # As docs/operations.rst tells production to run: every
                    # process writes its metrics samples to a shared directory.
                    "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                    "PYTHONPATH": str(ROOT),
                    **env,
                },
            )
            try:
                yield p
            finally:
                p.stop()
                redis.stop()
