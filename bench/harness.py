"""Start what a benchmark needs on 127.0.0.1, and stop it: Redis, gunicorn, Celery workers.

Every benchmark builds a :class:`Platform` in a temporary directory with its
own embedded Redis and its own database (SQLite there, or a fresh PostgreSQL
database when ``BENCH_POSTGRES_URL`` names a server's maintenance database),
so a run never touches anything else on the machine.
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
from sqlalchemy import create_engine, text

from app.db import Database
from app.embedded_redis import EmbeddedRedis, free_port
from app.migrate import upgrade
from app.services import organizations

RESULTS = Path(__file__).parent / "results"


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

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115  # owned by the process
        proc = subprocess.Popen(
            argv,
            env={**self.env, **env},
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
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("gunicorn did not start")

    def worker(self, name: str = "worker", queues: str = "tasks", concurrency: int = 2) -> None:
        self.start(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.main",
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
        )

    def beat(self) -> None:
        self.start(
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

    def stop(self) -> None:
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
                    **env,
                },
            )
            try:
                yield p
            finally:
                p.stop()
                redis.stop()
