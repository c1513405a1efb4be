"""Waybill against what a user writes by hand, "lean" and "as shipped", on one database per run.

Three sides run beside each other on one Redis (the broker) and one kind of database:

* **Waybill**, in one of two modes:

  - ``lean``: its processes started directly, as the other benchmarks do
    (``waybill serve`` with ``WEB_CONCURRENCY=2``, 16 threads; the ``tasks``
    worker at concurrency 2, the ``webhooks,maintenance`` worker at 4 and beat,
    ``--without-gossip --without-mingle``, Celery log level WARNING; the
    harness's embedded Redis without persistence);
  - ``shipped``: ``waybill run`` itself, what ``make run`` starts, with only
    ``VAR_DIR`` (a temporary directory), ``HTTP_PORT`` and ``FLOWER_PORT``
    (free ports) set, plus ``DATABASE_URL`` on PostgreSQL: honcho runs the
    Procfile (``waybill serve`` with its default ``WEB_CONCURRENCY=4``, both
    workers with task events (``TASK_EVENTS``) and log level INFO, beat, Flower), its own embedded
    Redis (append-only file on), the SQLite file under ``VAR_DIR``; the demo
    organization it makes is given credits with ``waybill org credit``.

* **hand-written** (``bench/handwritten.py``): Flask + SQLAlchemy Core + Celery
  + requests, INSERT and ``apply_async`` on submit, UPDATE and webhook POST in
  the task; gunicorn with Waybill's web process and thread counts, one Celery
  worker at Waybill's ``tasks`` concurrency (2), on the same Redis; its own
  table (its own file on SQLite, Waybill's database on PostgreSQL).
* **bare endpoint and raw Celery** (``bench/baseline_app.py``): the existing
  baselines, ``INSERT`` + ``apply_async`` of a no-op, same process counts.

Measures, each side in turn on the same processes:

* ``latency``: idle, one task at a time, submit -> webhook received (echo,
  ``task.succeeded``), Waybill and hand-written alternating, ``samples`` each;
* ``end_to_end``: ``tasks`` echo tasks *without* webhook submitted by
  ``clients`` keep-alive clients while the workers run, from the first submit
  to the last task ``succeeded`` in SQL; the raw Celery reference is the same
  number of no-op ``send_task`` calls from ``clients`` threads, until its
  queue is empty;
* ``submission``: requests/s of ``clients`` clients for ``window`` seconds
  while each side's worker consumes (Waybill, hand-written, bare endpoint, in
  turn for ``rounds`` rounds; each side's backlog drained before the next);
* ``batch``: ``POST /v1/tasks/batch`` with ``batch_size`` tasks per request,
  same clients and window, in tasks/s against Waybill's single submissions
  (reported as not available while the server answers anything but 200).

Targets (one table per database and mode): submissions/s >= 0.8 x the bare
endpoint; batch >= 5 x single in tasks/s; submit -> finished tasks/s >= 1.0 x
hand-written and >= 0.6 x raw Celery; idle submit -> webhook p50 <= 1.5 x
hand-written.

    python bench/versus.py [--db sqlite|postgresql|both] [--mode lean|shipped|both] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis
import requests
from sqlalchemy import Engine, bindparam, create_engine, text

from app.db import Database
from app.embedded_redis import free_port
from bench import baseline_app, handwritten
from bench.harness import DB_KINDS, database, percentile, platform, summary, write_results
from bench.report import Target, bar_chart, get, table
from config import Settings
from tests.support import ROOT, Process, Receiver, Stack, answer_no_content

MODES = ("lean", "shipped")
NAN = float("nan")
TIMEOUT = 30.0
# Tasks/s of ``tasks`` Celery processes: Waybill's ``tasks`` worker in both
# modes (the Procfile's WORKER_CONCURRENCY default), and so the other sides'.
WORKER_CONCURRENCY = 2
WEB_THREADS = 16
CREDITS = 10_000_000

# The targets of the issue: (key, label, low, high).
TARGETS = (
    ("submission", "submissions/s / bare endpoint", 0.8, None),
    ("batch", "batch / single tasks/s", 5.0, None),
    ("end_to_end", "submit->finished / hand-written", 1.0, None),
    ("end_to_end_raw", "submit->finished / raw Celery", 0.6, None),
    ("latency", "idle webhook p50 / hand-written", None, 1.5),
)


# --- load ------------------------------------------------------------------------------------------


class Refused(Exception):
    """A request the server did not accept; its message is what it answered."""


# One request of a client: the units (tasks) it got accepted, or Refused.
Send = Callable[[requests.Session, int], int]


@dataclass
class Load:
    units: int
    requests: int
    errors: int
    started: float  # time.perf_counter() when the clients were let go
    seconds: float
    latencies_ms: list[float]
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else NAN

    def as_dict(self) -> dict[str, Any]:
        return {
            "units": self.units,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "rate_per_s": self.rate,
            "latency_ms": summary(self.latencies_ms),
            "first_error": self.first_error,
        }


def drive(
    send: Send, *, clients: int, total: int, max_seconds: float, headers: dict[str, str] | None = None
) -> Load:
    """``total`` requests at most from ``clients`` keep-alive sessions, for ``max_seconds`` at most.

    As ``bench/load.py``'s ``hammer``, but a request may carry many tasks
    (a batch): ``send`` says how many were accepted.
    """
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    tally = {"units": 0, "requests": 0, "errors": 0}
    first_error = [""]
    gate = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client() -> None:
        session = requests.Session()
        session.headers.update(headers or {})
        mine: list[float] = []
        units = done = failed = 0
        gate.wait()
        while time.monotonic() < deadline[0]:
            i = next(counter)
            if i >= total:
                break
            t0 = time.perf_counter()
            try:
                got = send(session, i)
            except (Refused, requests.RequestException, ValueError, KeyError) as exc:
                failed += 1
                with lock:
                    first_error[0] = first_error[0] or f"{type(exc).__name__}: {exc}"[:300]
                continue
            done += 1
            units += got
            mine.append((time.perf_counter() - t0) * 1000)
        session.close()
        with lock:
            latencies.extend(mine)
            tally["units"] += units
            tally["requests"] += done
            tally["errors"] += failed

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + max_seconds
    started = time.perf_counter()
    gate.wait()
    for t in threads:
        t.join(max_seconds + 60)
    elapsed = time.perf_counter() - started
    return Load(
        tally["units"], tally["requests"], tally["errors"], started, elapsed, latencies, first_error[0]
    )


def post_one(url: str, make_body: Callable[[int], dict[str, Any]]) -> Send:
    def send(s: requests.Session, i: int) -> int:
        r = s.post(url, json=make_body(i), timeout=TIMEOUT)
        if r.status_code not in (200, 202):
            raise Refused(f"HTTP {r.status_code}: {r.text[:200]}")
        return 1

    return send


def post_batch(url: str, size: int) -> Send:
    def send(s: requests.Session, i: int) -> int:
        tasks = [{"type": "echo", "input": {"n": i * size + k}} for k in range(size)]
        r = s.post(url, json={"tasks": tasks}, timeout=2 * TIMEOUT)
        if r.status_code != 200:
            raise Refused(f"HTTP {r.status_code}: {r.text[:200]}")
        items = r.json()["data"]
        accepted = sum(1 for item in items if item.get("status") == 202)
        if accepted < len(items):
            refused = next(item for item in items if item.get("status") != 202)
            raise Refused(f"{len(items) - accepted} of {len(items)} items refused, e.g. {refused}"[:300])
        return accepted

    return send


def drain(pending: Callable[[], int], timeout: float) -> dict[str, Any]:
    """Until ``pending()`` is 0 (a side's backlog worked off), ``timeout`` seconds at most."""
    started = time.monotonic()
    left = pending()
    while left > 0 and time.monotonic() - started < timeout:
        time.sleep(0.05)
        left = pending()
    return {"seconds": round(time.monotonic() - started, 2), "left": left}


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle, since boot."""
    t = psutil.cpu_times()
    return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)


def end_to_end(
    send: Send,
    finished: Callable[[int], bool],
    *,
    tasks: int,
    clients: int,
    headers: dict[str, str] | None = None,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """``tasks`` submitted by ``clients`` clients: first submit -> ``finished(accepted)`` holds.

    Also the machine's CPU time over the run (every process: servers,
    workers, Redis, the database, these clients), per task and as a share of
    all cores: near 1.0, the run is bound by CPU, and the throughput of two
    sides compares as the inverse of their CPU per task.
    """
    cpu_before = busy_cpu_seconds()
    load = drive(send, clients=clients, total=tasks, max_seconds=timeout, headers=headers)
    deadline = time.monotonic() + timeout
    done = finished(load.units)
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
        done = finished(load.units)
    seconds = time.perf_counter() - load.started
    cpu = busy_cpu_seconds() - cpu_before
    return {
        "cpu_ms_per_task": 1000 * cpu / load.units if load.units else NAN,
        "cpu_busy": cpu / (seconds * (psutil.cpu_count() or 1)) if seconds > 0 else NAN,
        "tasks": load.units,
        "errors": load.errors,
        "first_error": load.first_error,
        "submit_s": round(load.seconds, 3),
        "seconds": round(seconds, 3),
        "finished": done,
        "rate_per_s": load.units / seconds if done and seconds > 0 else NAN,
        "submit_rate_per_s": load.rate,
    }


# --- the processes of one run ----------------------------------------------------------------------


@dataclass
class Setup:
    """One run's processes (Waybill in one mode, hand-written, bare) and how to reach and count them."""

    mode: str
    db_kind: str
    stack: Stack
    workdir: Path
    redis_url: str
    waybill_url: str
    waybill_key: str
    waybill_db: str  # the database Waybill's tasks are in (waybill run's own SQLite file when shipped)
    baseline_db: str
    web_workers: int
    handwritten_db: str = ""
    handwritten_url: str = ""
    handwritten_token: str = ""
    bare_url: str = ""
    engines: dict[str, Engine] = field(default_factory=dict)

    def engine(self, url: str) -> Engine:
        # One small engine per database for the benchmark's own reads; on
        # SQLite plain connections (no BEGIN IMMEDIATE): polling never locks.
        if url not in self.engines:
            self.engines[url] = create_engine(url, pool_size=1)
        return self.engines[url]

    def count(self, url: str, sql: str) -> int:
        with self.engine(url).connect() as conn:
            return int(conn.execute(text(sql)).scalar() or 0)

    def dispose(self) -> None:
        for engine in self.engines.values():
            engine.dispose()
        self.engines.clear()


def start_others(setup: Setup) -> None:
    """The hand-written version and the bare baselines, with Waybill's web process and worker counts."""
    stack, workdir = setup.stack, setup.workdir
    setup.handwritten_db = (
        f"sqlite:///{workdir / 'handwritten.sqlite3'}" if setup.db_kind == "sqlite" else setup.baseline_db
    )
    setup.handwritten_token = secrets.token_urlsafe(16)
    handwritten.create_table(setup.handwritten_db)
    baseline_app.create_table(setup.baseline_db)
    stack.env.update(
        {
            "REDIS_URL": setup.redis_url,
            "DATABASE_URL": setup.baseline_db,
            handwritten.DATABASE_ENV: setup.handwritten_db,
            handwritten.BROKER_ENV: setup.redis_url,
            handwritten.TOKEN_ENV: setup.handwritten_token,
        }
    )
    _, setup.handwritten_url = stack.gunicorn(
        "handwritten-web", "bench.handwritten:create_app()", setup.web_workers, WEB_THREADS
    )
    _, setup.bare_url = stack.gunicorn(
        "baseline-web", "bench.baseline_app:create_app()", setup.web_workers, WEB_THREADS
    )
    if setup.mode == "lean":
        # Started as the lean Waybill workers are (Stack.worker's flags).
        stack.worker(
            "handwritten-worker",
            queues=handwritten.QUEUE,
            concurrency=WORKER_CONCURRENCY,
            app="bench.handwritten",
        )
    else:
        # The command its author would put in a Procfile.
        stack.start(
            "handwritten-worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.handwritten",
                "worker",
                "--queues",
                handwritten.QUEUE,
                "--concurrency",
                str(WORKER_CONCURRENCY),
                "--loglevel",
                "INFO",
            ],
        )
    stack.worker(
        "baseline-worker", queues=baseline_app.QUEUE, concurrency=WORKER_CONCURRENCY, app="bench.baseline_app"
    )


@contextlib.contextmanager
def lean(db_kind: str, **env: str) -> Iterator[Setup]:
    """Waybill's processes started one by one, as every other benchmark does (``bench/harness.py``)."""
    with platform(db_kind, **env) as p:
        p.serve(workers=2, threads=WEB_THREADS)
        p.worker("worker", queues="tasks", concurrency=WORKER_CONCURRENCY)
        p.worker("webhooks", queues="webhooks,maintenance", concurrency=4)
        p.beat()
        key = p.org("bench-versus").api_key
        setup = Setup(
            mode="lean",
            db_kind=db_kind,
            stack=p,
            workdir=p.log_dir,
            redis_url=p.redis.url,
            waybill_url=p.base_url,
            waybill_key=key,
            waybill_db=p.database_url,
            baseline_db=p.database_url,
            web_workers=2,
        )
        try:
            start_others(setup)
            yield setup
        finally:
            setup.dispose()


def newcomer_env(workdir: Path, db_url: str | None) -> dict[str, str]:
    """This environment without any Waybill setting, plus what the local run needs to stay apart."""
    names = {f.name.upper() for f in fields(Settings)}
    names |= {"PROMETHEUS_MULTIPROC_DIR", "WORKER_CONCURRENCY", "WEBHOOK_CONCURRENCY", "WAYBILL_LOCAL_RUN"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(
        VAR_DIR=str(workdir / "var"),
        HTTP_PORT=str(free_port()),
        FLOWER_PORT=str(free_port()),
        PYTHONPATH=str(ROOT),
    )
    if db_url:
        env["DATABASE_URL"] = db_url
    return env


@contextlib.contextmanager
def shipped(db_kind: str) -> Iterator[Setup]:
    """``waybill run``, as ``make run`` starts it, in a temporary ``VAR_DIR`` on free ports."""
    with tempfile.TemporaryDirectory(prefix="waybill-bench-") as tmp:
        workdir = Path(tmp)
        with database(db_kind, workdir) as url:
            env = newcomer_env(workdir, url if db_kind == "postgresql" else None)
            waybill = str(Path(sys.executable).parent / "waybill")
            stack = Stack(
                env={**os.environ, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING"},
                log_dir=workdir,
                db=Database(url),
                loglevel="WARNING",
                wait_ready=False,
            )
            run = Process("waybill-run", [waybill, "run"], env, workdir, cwd=ROOT)
            stack.procs.append(run)
            started: list[psutil.Process] = []
            setup: Setup | None = None
            try:
                base = f"http://127.0.0.1:{env['HTTP_PORT']}"
                stack.wait_healthy(run, base, "waybill run", timeout=120)
                var = workdir / "var"
                demo = json.loads((var / "demo.json").read_text())
                subprocess.run(
                    [waybill, "org", "credit", demo["organizationId"], str(CREDITS)],
                    env=env,
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                waybill_db = (
                    url if db_kind == "postgresql" else Settings.from_env(env).resolved_database_url()
                )
                setup = Setup(
                    mode="shipped",
                    db_kind=db_kind,
                    stack=stack,
                    workdir=workdir,
                    redis_url=(var / "redis" / "url").read_text().strip(),
                    waybill_url=base,
                    waybill_key=demo["apiKey"],
                    waybill_db=waybill_db,
                    baseline_db=url,
                    web_workers=Settings().web_concurrency,
                )
                started = psutil.Process(run.pid).children(recursive=True)
                start_others(setup)
                yield setup
            finally:
                if setup is not None:
                    setup.dispose()
                with contextlib.suppress(psutil.Error):  # the pools' processes forked since
                    started += psutil.Process(run.pid).children(recursive=True)
                stack.stop()
                # honcho stops its processes, in sessions of their own, within
                # 5 s; whatever of the run outlived that is ended here.
                for proc in started:
                    with contextlib.suppress(psutil.Error):
                        if proc.is_running():
                            proc.kill()
                stack.db.dispose()


# --- the measures ----------------------------------------------------------------------------------


def waybill_session(setup: Setup) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {setup.waybill_key}"
    return s


def handwritten_sample(s: requests.Session, base: str, hook: Receiver, i: int) -> float:
    t0 = time.perf_counter()
    r = s.post(
        base + "/tasks", json={"input": {"n": i}, "webhookUrl": hook.url + "/handwritten"}, timeout=TIMEOUT
    )
    if r.status_code != 202:
        raise RuntimeError(f"hand-written submit: HTTP {r.status_code}: {r.text[:200]}")
    arrived = hook.wait_for_task(r.json()["taskId"], TIMEOUT)
    if arrived is None:
        raise TimeoutError("a hand-written webhook did not arrive within 30 s")
    return (arrived - t0) * 1000


@dataclass
class Phases:
    """Where one idle Waybill task's time went: client clocks beside the task row's own."""

    task_id: str
    submitted: float  # time.time() when the client sent the submission
    answered: float  # time.time() when its response arrived
    received: float  # time.time() when the webhook arrived (converted from the receiver's clock)


def waybill_phased_sample(
    s: requests.Session, base: str, hook: Receiver, i: int, into: list[Phases]
) -> float:
    """``webhook_sample``, also keeping the times that ``phases`` splits the path at."""
    wall, t0 = time.time(), time.perf_counter()
    r = s.post(
        base + "/v1/tasks",
        json={"type": "echo", "input": {"n": i}, "webhook": {"url": hook.url + "/hook"}},
        timeout=TIMEOUT,
    )
    answered = wall + time.perf_counter() - t0
    if r.status_code != 202:
        raise RuntimeError(f"Waybill submit: HTTP {r.status_code}: {r.text[:200]}")
    task_id = r.json()["taskId"]
    arrived = hook.wait_for_task(task_id, TIMEOUT)
    if arrived is None:
        raise TimeoutError("a webhook did not arrive within 30 s")
    into.append(Phases(task_id, wall, answered, wall + arrived - t0))
    return (arrived - t0) * 1000


def phases(setup: Setup, samples: list[Phases]) -> dict[str, float]:
    """p50 ms of each leg of the idle path: the response, then the task row's started and completed times.

    One machine, one clock: the client's ``time.time()`` and the row's UTC
    timestamps (stored to the microsecond) compare directly.
    """
    if not samples:
        return {}
    by_id = {p.task_id: p for p in samples}
    query = text("SELECT id, started_at, completed_at FROM tasks WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    legs: dict[str, list[float]] = {"response": [], "to_started": [], "to_recorded": [], "to_webhook": []}
    with setup.engine(setup.waybill_db).connect() as conn:
        for task_id, started, completed in conn.execute(query, {"ids": list(by_id)}):
            p = by_id[task_id]
            started_s, completed_s = _epoch(started), _epoch(completed)
            legs["response"].append((p.answered - p.submitted) * 1000)
            legs["to_started"].append((started_s - p.submitted) * 1000)
            legs["to_recorded"].append((completed_s - started_s) * 1000)
            legs["to_webhook"].append((p.received - completed_s) * 1000)
    return {name: percentile(values, 50) for name, values in legs.items() if values}


def _epoch(value: Any) -> float:
    """A row's timestamp (a datetime, or SQLite's text) as seconds since the epoch, UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def measure_latency(setup: Setup, samples: int, warmup: int = 5) -> dict[str, Any]:
    times: dict[str, list[float]] = {"waybill": [], "handwritten": []}
    legs: list[Phases] = []
    with Receiver(answer_no_content) as hook:
        wb = waybill_session(setup)
        hw = requests.Session()
        hw.headers["Authorization"] = f"Bearer {setup.handwritten_token}"
        samplers: dict[str, Callable[[int], float]] = {
            "waybill": lambda i: waybill_phased_sample(
                wb, setup.waybill_url, hook, i, legs if i >= warmup else []
            ),
            "handwritten": lambda i: handwritten_sample(hw, setup.handwritten_url, hook, i),
        }
        # Warm-up, not recorded: the workers have started and each pool process has run something.
        for i in range(warmup + samples):
            for name, sample in samplers.items():
                t = sample(i)
                if i >= warmup:
                    times[name].append(t)
                time.sleep(0.02)  # idle between samples
        wb.close()
        hw.close()
    out: dict[str, Any] = {name: summary(v) for name, v in times.items()}
    out["p50_ratio"] = out["waybill"]["p50"] / out["handwritten"]["p50"]
    out["waybill_phases_p50_ms"] = phases(setup, legs)
    return out


@dataclass
class Sides:
    """Per side: how a client submits one task, its headers, and its backlog."""

    send: dict[str, Send]
    headers: dict[str, dict[str, str]]
    pending: dict[str, Callable[[], int]]
    redis: redis.Redis

    def close(self) -> None:
        self.redis.close()


def sides(setup: Setup) -> Sides:
    client = redis.Redis.from_url(setup.redis_url)
    echo: Callable[[int], dict[str, Any]] = lambda i: {"type": "echo", "input": {"n": i}}  # noqa: E731
    return Sides(
        send={
            "waybill": post_one(setup.waybill_url + "/v1/tasks", echo),
            "handwritten": post_one(setup.handwritten_url + "/tasks", lambda i: {"input": {"n": i}}),
            "bare": post_one(setup.bare_url + "/baseline/tasks", echo),
        },
        headers={
            "waybill": {"Authorization": f"Bearer {setup.waybill_key}"},
            "handwritten": {"Authorization": f"Bearer {setup.handwritten_token}"},
            "bare": {},
        },
        pending={
            "waybill": lambda: setup.count(
                setup.waybill_db, "SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')"
            ),
            "handwritten": lambda: setup.count(
                setup.handwritten_db, f"SELECT count(*) FROM {handwritten.TABLE} WHERE status = 'queued'"
            ),
            "bare": lambda: int(client.llen(baseline_app.QUEUE)),
        },
        redis=client,
    )


def measure_end_to_end(setup: Setup, sd: Sides, *, tasks: int, clients: int) -> dict[str, Any]:
    """Waybill, hand-written, raw Celery in turn: ``tasks`` each, first submit -> last finished."""

    def succeeded(url: str, table_name: str) -> Callable[[], int]:
        return lambda: setup.count(url, f"SELECT count(*) FROM {table_name} WHERE status = 'succeeded'")

    out: dict[str, Any] = {"tasks": tasks, "clients": clients, "webhook": False}

    def all_of(done: Callable[[], int]) -> Callable[[int], bool]:
        before = done()
        return lambda n: done() - before >= n

    for name, done in (
        ("waybill", succeeded(setup.waybill_db, "tasks")),
        ("handwritten", succeeded(setup.handwritten_db, handwritten.TABLE)),
    ):
        out[name] = end_to_end(
            sd.send[name], all_of(done), tasks=tasks, clients=clients, headers=sd.headers[name]
        )
    # Raw Celery: the no-op of the baseline app (Waybill's worker settings),
    # sent by as many threads, finished when its queue is empty (prefetch 1:
    # at most one message per process is then still running, a no-op).
    celery = baseline_app.make_celery(setup.redis_url)

    def publish(_s: requests.Session, i: int) -> int:
        celery.send_task(baseline_app.NOOP, args=[i], queue=baseline_app.QUEUE)
        return 1

    bare_pending = sd.pending["bare"]
    out["raw_celery"] = end_to_end(publish, lambda _n: bare_pending() == 0, tasks=tasks, clients=clients)
    celery.close()
    wb, hw, raw = (out[k]["rate_per_s"] for k in ("waybill", "handwritten", "raw_celery"))
    out["ratio_handwritten"] = wb / hw
    out["ratio_raw_celery"] = wb / raw
    return out


def measure_submission(
    sd: Sides, *, clients: int, window: float, rounds: int, max_requests: int = 50_000
) -> dict[str, Any]:
    """Requests/s of each side in turn while its worker consumes; each backlog drained before the next."""
    names = ("waybill", "handwritten", "bare")
    for name in names:  # warm-up, not counted: every gunicorn worker and thread has served
        drive(sd.send[name], clients=clients, total=clients * 5, max_seconds=window, headers=sd.headers[name])
        drain(sd.pending[name], 120)
    parts: dict[str, list[Load]] = {name: [] for name in names}
    drains: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            parts[name].append(
                drive(
                    sd.send[name],
                    clients=clients,
                    total=max_requests,
                    max_seconds=window,
                    headers=sd.headers[name],
                )
            )
            drains[name].append(drain(sd.pending[name], 120))
    out: dict[str, Any] = {"clients": clients, "window_s": window, "rounds": rounds}
    for name in names:
        loads = parts[name]
        units, seconds = sum(x.units for x in loads), sum(x.seconds for x in loads)
        out[name] = {
            "ok": units,
            "errors": sum(x.errors for x in loads),
            "seconds": round(seconds, 3),
            "rate_per_s": units / seconds if seconds else NAN,
            "latency_ms": summary([v for x in loads for v in x.latencies_ms]),
            "first_error": next((x.first_error for x in loads if x.first_error), ""),
            # how long its worker took to catch up after each window
            "drain_s": [d["seconds"] for d in drains[name]],
        }
    out["ratio_bare"] = out["waybill"]["rate_per_s"] / out["bare"]["rate_per_s"]
    out["ratio_handwritten"] = out["waybill"]["rate_per_s"] / out["handwritten"]["rate_per_s"]
    return out


def batch_commit() -> str:
    """The latest of the last 30 commits that mentions a batch (``git log``, read only), or ""."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        log = subprocess.run(
            ["git", "log", "--oneline", "-30"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout
        return next((line for line in log.splitlines() if "batch" in line.lower()), "")
    return ""


def batch_available(setup: Setup) -> str:
    """Why ``POST /v1/tasks/batch`` cannot be measured, or "" when it accepts a one-item batch."""
    with waybill_session(setup) as s:
        try:
            r = s.post(
                setup.waybill_url + "/v1/tasks/batch",
                json={"tasks": [{"type": "echo", "input": {"n": -1}}]},
                timeout=TIMEOUT,
            )
            data = r.json().get("data") if r.status_code == 200 else None
        except (requests.RequestException, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
    if isinstance(data, list) and data and data[0].get("status") == 202:
        return ""
    return f"POST /v1/tasks/batch answered HTTP {r.status_code}: {r.text[:160]}"


def measure_batch(
    setup: Setup, sd: Sides, single: float, *, clients: int, window: float, size: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"batch_size": size, "clients": clients, "window_s": window, "single_per_s": single}
    # What was measured: a commit, or changes in the work tree not committed yet.
    out["commit"] = batch_commit() or "none yet: the work tree's uncommitted code"
    why = batch_available(setup)
    if why:
        out.update(available=False, reason=why, ratio=NAN)
        return out
    # No warm-up of its own: the single submissions' warmed every web thread,
    # and the probe above loaded the batch code path in one web process.
    send = post_batch(setup.waybill_url + "/v1/tasks/batch", size)
    load = drive(
        send, clients=clients, total=clients * 1000, max_seconds=window, headers=sd.headers["waybill"]
    )
    out.update(available=True, waybill=load.as_dict(), ratio=load.rate / single)
    return out


def run(
    db_kind: str,
    mode: str = "lean",
    *,
    clients: int = 16,
    window: float = 3.0,
    rounds: int = 2,
    tasks: int = 2000,
    samples: int = 50,
    batch_size: int = 100,
    **env: str,
) -> dict[str, Any]:
    """One database in one mode; ``env`` (e.g. ``LOG_LEVEL``) applies to the lean mode only."""
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    out: dict[str, Any] = {"db": db_kind, "mode": mode}
    setup_cm = lean(db_kind, **env) if mode == "lean" else shipped(db_kind)
    with setup_cm as setup:
        out["processes"] = {
            "web_workers": setup.web_workers,
            "web_threads": WEB_THREADS,
            "worker_concurrency": WORKER_CONCURRENCY,
        }
        sd = sides(setup)
        out["startup_s"] = round(time.monotonic() - started, 1)
        steps: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
            (
                "latency",
                f"latency, {samples} samples per side",
                lambda: measure_latency(setup, samples),
            ),
            (
                "end_to_end",
                f"submit -> finished, {tasks:,} tasks per side",
                lambda: measure_end_to_end(setup, sd, tasks=tasks, clients=clients),
            ),
            (
                "submission",
                f"submissions, {rounds} x {window:g} s per side",
                lambda: measure_submission(sd, clients=clients, window=window, rounds=rounds),
            ),
            (
                "batch",
                f"batch of {batch_size}",
                lambda: measure_batch(
                    setup,
                    sd,
                    out["submission"]["waybill"]["rate_per_s"],
                    clients=clients,
                    window=window,
                    size=batch_size,
                ),
            ),
        ]
        print(f"  {db_kind}, {mode}: processes up in {out['startup_s']:.0f} s", flush=True)
        for key, what, measure in steps:
            t0 = time.monotonic()
            out[key] = measure()
            print(f"  {db_kind}, {mode}: {what}: {time.monotonic() - t0:.0f} s", flush=True)
        sd.close()
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    out["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return out


# --- report ----------------------------------------------------------------------------------------


def rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every compared figure of one run: measure, Waybill, reference, ratio and its target if any."""
    sub, e2e, lat, batch = (r.get(k, {}) for k in ("submission", "end_to_end", "latency", "batch"))
    tasks = int(e2e.get("tasks", 0))

    def row(measure: str, reference: str, waybill: float, base: float, key: str = "") -> dict[str, Any]:
        target = next((t for t in TARGETS if t[0] == key), None)
        return {
            "measure": measure,
            "reference": reference,
            "waybill": waybill,
            "baseline": base,
            "ratio": waybill / base if base else NAN,
            "target": target,
        }

    out = [
        row(
            f"submissions/s, {sub.get('clients', '?')} clients, worker consuming",
            "bare endpoint",
            get(sub, "waybill", "rate_per_s"),
            get(sub, "bare", "rate_per_s"),
            "submission",
        ),
        row(
            "submissions/s, same",
            "hand-written",
            get(sub, "waybill", "rate_per_s"),
            get(sub, "handwritten", "rate_per_s"),
        ),
        row(
            f"batch tasks/s ({batch.get('batch_size', '?')} per request)",
            "single submissions",
            get(batch, "waybill", "rate_per_s"),
            get(batch, "single_per_s"),
            "batch",
        ),
        row(
            f"submit->finished tasks/s ({tasks:,}, no webhook)",
            "hand-written",
            get(e2e, "waybill", "rate_per_s"),
            get(e2e, "handwritten", "rate_per_s"),
            "end_to_end",
        ),
        row(
            "submit->finished tasks/s, same",
            "raw Celery no-op",
            get(e2e, "waybill", "rate_per_s"),
            get(e2e, "raw_celery", "rate_per_s"),
            "end_to_end_raw",
        ),
        row(
            "machine CPU ms per task, same",
            "hand-written",
            get(e2e, "waybill", "cpu_ms_per_task"),
            get(e2e, "handwritten", "cpu_ms_per_task"),
        ),
        row(
            "machine CPU busy share, same",
            "hand-written",
            get(e2e, "waybill", "cpu_busy"),
            get(e2e, "handwritten", "cpu_busy"),
        ),
        row(
            "idle submit->webhook p50 ms",
            "hand-written",
            get(lat, "waybill", "p50"),
            get(lat, "handwritten", "p50"),
            "latency",
        ),
        row(
            "idle submit->webhook p95 ms",
            "hand-written",
            get(lat, "waybill", "p95"),
            get(lat, "handwritten", "p95"),
        ),
    ]
    if batch and not batch.get("available", False):
        out[2]["unavailable"] = batch.get("reason", "not measured")
    return out


def targets(r: dict[str, Any]) -> list[Target]:
    """The run's targets (a batch endpoint not there yet is left out, not failed)."""
    found = []
    for x in rows(r):
        if x["target"] is None or "unavailable" in x:
            continue
        _, label, low, high = x["target"]
        found.append(Target(f"{label} ({r['db']}, {r['mode']})", x["ratio"], low=low, high=high))
    return found


def print_results(results: list[dict[str, Any]]) -> None:
    for r in results:
        body = []
        for x in rows(r):
            target = x["target"]
            if target is None:
                wanted, met = "", ""
            else:
                t = Target("", x["ratio"], low=target[2], high=target[3])
                wanted = t.wanted
                met = "not available" if "unavailable" in x else ("met" if t.holds else "NOT MET")
            body.append([x["measure"], x["reference"], x["waybill"], x["baseline"], x["ratio"], wanted, met])
        load = r.get("load_average", ["?", "?"])
        procs = r.get("processes", {})
        web = f"web {procs.get('web_workers', '?')} x {procs.get('web_threads', '?')} threads"
        table(
            f"Waybill vs hand-written: {r['db']}, {r['mode']} ({web}, Celery concurrency "
            f"{procs.get('worker_concurrency', '?')}; load average {load[0]} -> {load[1]})",
            ["measure", "reference", "waybill", "reference value", "ratio", "target", "met"],
            body,
            digits=2,
        )
        for x in rows(r):
            if "unavailable" in x:
                print(f"  batch not measured: {x['unavailable']}")
        legs = r.get("latency", {}).get("waybill_phases_p50_ms") or {}
        if legs:
            print(
                "  Waybill's idle path, p50 ms: response {response:.1f}; submit -> started {to_started:.1f}; "
                "started -> result recorded {to_recorded:.1f}; recorded -> webhook received "
                "{to_webhook:.1f}".format(**legs)
            )
        if r.get("batch", {}).get("available"):
            print(f"  batch endpoint measured at commit: {r['batch']['commit']}")
        for key in ("submission", "end_to_end"):
            for side, m in r.get(key, {}).items():
                if isinstance(m, dict) and m.get("first_error"):
                    print(f"  {key} {side}: {m.get('errors', '?')} errors, first: {m['first_error']}")


def chart(results: list[dict[str, Any]]) -> None:
    groups = [f"{r['db']}\n{r['mode']}" for r in results]
    bar_chart(
        "versus",
        "Submit -> finished (tasks/s, no webhook)",
        groups,
        {
            "waybill": [get(r, "end_to_end", "waybill", "rate_per_s") for r in results],
            "hand-written": [get(r, "end_to_end", "handwritten", "rate_per_s") for r in results],
            "raw celery no-op": [get(r, "end_to_end", "raw_celery", "rate_per_s") for r in results],
        },
        "tasks/s",
    )


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"clients": 8, "window": 1.5, "rounds": 1, "tasks": 300, "samples": 10, "batch_size": 100}
    return {"clients": 16, "window": 3.0, "rounds": 2, "tasks": 2000, "samples": 50, "batch_size": 100}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=[*DB_KINDS, "both"], default="both")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke run")
    parser.add_argument("--log-level", default="INFO", help="Waybill's LOG_LEVEL in the lean mode")
    args = parser.parse_args()
    kinds = list(DB_KINDS) if args.db == "both" else [args.db]
    modes = list(MODES) if args.mode == "both" else [args.mode]
    results = [
        run(kind, mode, **sizes(args.quick), LOG_LEVEL=args.log_level) for kind in kinds for mode in modes
    ]
    print_results(results)
    chart(results)
    print(f"written: {write_results('versus', {'results': results})}")


if __name__ == "__main__":
    main()
