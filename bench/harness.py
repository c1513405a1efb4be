"""Start what a benchmark needs on 127.0.0.1, and stop it: Redis, gunicorn, Celery workers.

Every benchmark builds a :class:`Platform` in a temporary directory with its
own embedded Redis and its own database (SQLite there, or a fresh PostgreSQL
database on the server ``BENCH_POSTGRES_URL`` names, by default
``postgres@127.0.0.1:5432``), so a run never touches anything else on the
machine. The processes are the integration tests' (``tests.support.Stack``):
each in its own process group, stopped (killed if it must) when the
``platform()`` block ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, text, update

from app import ids
from app.db import Database
from app.dispatch.keys import CLIMIT, KNOWN, RING, RING_MEMBERS, waiting_key
from app.embedded_redis import EmbeddedRedis
from app.migrate import upgrade
from app.models import Organization, Task
from app.models.base import utcnow
from tests.support import ROOT, Org, Process, Stack
from tests.support.databases import fresh_postgresql

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


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh, migrated database: ``sqlite`` or ``postgresql``."""
    if kind == "sqlite":
        url = f"sqlite:///{workdir / 'bench.sqlite3'}"
        upgrade(url)
        yield url
        return
    admin_url = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    with fresh_postgresql(admin_url, "waybill_bench") as url:
        yield url


@dataclass(kw_only=True)
class Platform(Stack):
    """The processes of ``tests.support.Stack`` on a benchmark's own Redis and database.

    Workers log at WARNING and are not waited for (a benchmark's clock starts
    with the process); organizations get limits no benchmark reaches.
    """

    database_url: str
    redis: EmbeddedRedis
    loglevel: str = "WARNING"
    wait_ready: bool = False
    org_defaults: dict[str, int] = field(
        default_factory=lambda: {"credits": 10_000_000, "queue_limit": 1_000_000, "concurrency_limit": 100}
    )
    baseline_url: str = ""
    _engine: Any = None

    def baseline_web(self, workers: int = 2, threads: int = 16) -> Process:
        """The bare Flask baseline (``bench/baseline_app.py``) under gunicorn, flags as ``waybill serve``.

        Only ``--config python:app.gunicorn_conf`` is left out: it holds
        Waybill's graceful timeout and metrics hook, nothing that serves faster.
        """
        from bench.baseline_app import create_table

        create_table(self.database_url)
        proc, self.baseline_url = self.gunicorn(
            "baseline-web", "bench.baseline_app:create_app()", workers, threads
        )
        return proc

    def org(self, name: str = "acme", **kwargs: int) -> Org:
        created = super().org(name, **kwargs)
        self.db.dispose()  # no connection of the benchmark's own stays open while it measures
        return created

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

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        super().stop()
        self.db.dispose()


@contextlib.contextmanager
def platform(db_kind: str = "sqlite", **env: str) -> Iterator[Platform]:
    with tempfile.TemporaryDirectory(prefix="waybill-bench-") as tmp:
        workdir = Path(tmp)
        with database(db_kind, workdir) as url:
            redis = EmbeddedRedis(workdir / "redis", persist=False).start()
            metrics_dir = workdir / "metrics"
            metrics_dir.mkdir()
            p = Platform(
                log_dir=workdir,
                db=Database(url),
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
