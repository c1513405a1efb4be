"""Capacity per core: what one fully used core of each Waybill process serves, on each Celery broker.

For the capacity model of ``docs/scaling.rst``: on PostgreSQL, once with the
Celery broker on Redis and once on RabbitMQ (``BROKER_URL``; the dispatch
state stays on ``REDIS_URL``), each in its own platform (``bench/harness.py``).
The phases run one after the other, each with only the processes it measures:

* ``submission``: ``waybill serve`` (gunicorn, ``--web-workers`` processes,
  16 threads) alone; ``--clients`` threads POST echo tasks (the organization's
  concurrency limit is above the burst). Dispatch keeps only
  ``DISPATCH_QUEUE_TARGET`` (8) released tasks ahead of the workers, so the
  web publishes the first few run messages and the rest wait in Redis, as
  under a backlog in production.
* ``tasks``: the Procfile's ``tasks`` worker (``--concurrency 2``) alone runs
  them: claim, lease, echo handler (``bench/processing.py``'s task type),
  result recorded, slot released and the next run message published (the
  finish's dispatch step): that publish counts per task run, not per submission.
* ``webhooks``: echo tasks with a webhook to a local receiver are submitted
  and run first (not measured), then a ``webhooks`` worker (``--concurrency 4``)
  alone delivers them: claim, sign, POST, attempt recorded.
* ``background``: beat and the ``webhooks,maintenance`` worker with nothing to
  do (dispatch steps every second, the sweep): a cost per second, not per task.

Per phase:

* CPU per unit: user + system seconds of the phase's process tree (gunicorn's
  master and workers, Celery's main process and pool children; psutil, reaped
  children included) over a steady window after warm-up, divided by the units
  done in it; ``1 / that`` is the units per second of one fully used core.
  On a shared 2-core machine this is the robust figure; the wall rate
  (units per second of the window) is secondary.
* Per unit counts, over the phase's whole life (its processes' start to their
  stop, warm-up included) divided by all its units: SQL commits
  (``pg_stat_database.xact_commit`` of the benchmark's database, read once
  every backend of it has exited, which flushes its statistics), commands on
  the dispatch Redis (``INFO commandstats``, the benchmark's own INFO left
  out), and on the broker: for Redis, commands of the broker's own
  redis-server and messages = LPUSH + RPUSH (task messages) + PUBLISH (events);
  for RabbitMQ, ``message_stats.publish`` of the run's own vhost from the
  management API (``rabbitmq_management``; its statistics lag up to 5 s, so
  each reading waits until they hold still), events being the ``celeryev``
  exchange's ``publish_in``.

RabbitMQ: ``BENCH_RABBITMQ_URL`` (default ``amqp://guest:guest@127.0.0.1:5672``),
a vhost of its own per run (``rabbitmqctl add_vhost``; deleted at the end),
management API at ``BENCH_RABBITMQ_API`` (default ``http://127.0.0.1:15672``).

    python bench/capacity.py [--broker redis|rabbitmq|both] [--submissions 1500] [--webhooks 400]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.embedded_redis import EmbeddedRedis
from bench.harness import Platform, platform, write_results
from bench.load import hammer
from bench.report import table
from bench.submission import body as echo_body
from tests.support import Process, Receiver, answer_no_content
from tests.support.rabbitmq import vhost, vhost_of

BROKERS = ("redis", "rabbitmq")
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
RABBITMQ_API = os.environ.get("BENCH_RABBITMQ_API", "http://127.0.0.1:15672")
NAN = float("nan")


# --- counters ---------------------------------------------------------------------------------


def tree_cpu(*pids: int) -> float:
    """CPU seconds (user + system) of these processes and all their descendants, reaped ones included."""
    total = 0.0
    for pid in pids:
        if pid <= 0:
            continue
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds so far: the measured process tree, the Redis servers, each PostgreSQL backend."""

    component: float
    servers: dict[str, float]
    backends: dict[int, float]


def cpu_delta(a: CpuReading, b: CpuReading) -> dict[str, float]:
    """CPU seconds between two readings; a backend that started in between counts from zero."""
    out = {"component": b.component - a.component}
    out.update({name: b.servers[name] - a.servers.get(name, 0.0) for name in b.servers})
    if b.backends:
        out["postgresql"] = sum(t - a.backends.get(pid, 0.0) for pid, t in b.backends.items())
    return out


def redis_commands(url: str) -> dict[str, int]:
    """Calls per command since the server started, without the INFO calls that read them."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}


class Broker(Protocol):
    kind: str
    url: str
    note: str

    def counters(self) -> dict[str, float]: ...

    def settle(self) -> None: ...


class RedisBroker:
    """The broker on a redis-server of its own, apart from the dispatch Redis."""

    kind = "redis"
    note = "messages = LPUSH + RPUSH (task messages) + PUBLISH (events) on the broker's redis-server"

    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server
        self.url = server.url

    def counters(self) -> dict[str, float]:
        calls = redis_commands(self.url)
        pushes = calls.get("lpush", 0) + calls.get("rpush", 0)
        events = calls.get("publish", 0)
        return {
            "commands": sum(calls.values()),
            "messages": pushes + events,
            "task_messages": pushes,
            "events": events,
        }

    def settle(self) -> None:
        pass  # INFO is exact at once


class RabbitBroker:
    """A vhost of this run's own on the local RabbitMQ; counts from the management API."""

    kind = "rabbitmq"

    def __init__(self, vhost: str) -> None:
        self.vhost = vhost
        self.url = f"{RABBITMQ_URL.rstrip('/')}/{vhost}"
        parts = urlsplit(RABBITMQ_URL)
        self.auth = (parts.username or "guest", parts.password or "guest")
        self.note = (
            "messages = message_stats.publish of the vhost (management API); "
            "events = publish_in of the celeryev exchange"
        )
        try:
            requests.get(f"{RABBITMQ_API}/api/overview", auth=self.auth, timeout=5).raise_for_status()
            self.api = True
        except requests.RequestException as exc:
            self.api = False
            self.note = (
                f"no message counts: the management API at {RABBITMQ_API} does not answer "
                f"({type(exc).__name__}); `rabbitmq-plugins enable rabbitmq_management` provides it"
            )

    def _get(self, path: str) -> Any:
        r = requests.get(f"{RABBITMQ_API}/api/{path}/{quote(self.vhost, safe='')}", auth=self.auth, timeout=5)
        r.raise_for_status()
        return r.json()

    def counters(self) -> dict[str, float]:
        if not self.api:
            return {}
        stats = self._get("vhosts").get("message_stats") or {}
        events = sum(
            (e.get("message_stats") or {}).get("publish_in", 0)
            for e in self._get("exchanges")
            if e["name"] == "celeryev"
        )
        published = stats.get("publish", 0)
        return {
            "messages": published,
            "task_messages": published - events,
            "events": events,
            "delivered": stats.get("deliver_get", 0),
        }

    def settle(self, hold: float = 5.5, timeout: float = 20.0) -> None:
        """Until the counts hold still for ``hold`` seconds: the management plugin samples every 5 s."""
        if not self.api:
            return
        deadline = time.monotonic() + timeout
        last, since = self.counters(), time.monotonic()
        while time.monotonic() - since < hold and time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.counters()
            if now != last:
                last, since = now, time.monotonic()


def available(kinds: Iterable[str] = BROKERS) -> list[str]:
    """The brokers this machine can run: RabbitMQ needs ``rabbitmqctl`` (skipped, and said so, without)."""
    out = []
    for kind in kinds:
        if kind == "rabbitmq" and shutil.which("rabbitmqctl") is None:
            print("capacity: no rabbitmqctl on PATH, the RabbitMQ broker is skipped", flush=True)
            continue
        out.append(kind)
    return out


@contextlib.contextmanager
def broker(kind: str, workdir: Path) -> Iterator[Broker]:
    if kind == "redis":
        server = EmbeddedRedis(workdir / "broker-redis", persist=False).start()
        try:
            yield RedisBroker(server)
        finally:
            server.stop()
        return
    with vhost(RABBITMQ_URL, "waybill-bench") as url:
        yield RabbitBroker(vhost_of(url))


class Commits:
    """``xact_commit`` of the benchmark's database, read from the ``postgres`` database."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        self.name = url.database
        admin = os.environ.get("BENCH_POSTGRES_URL") or url.set(database="postgres")
        self.engine = create_engine(admin, isolation_level="AUTOCOMMIT", pool_size=1)
        # The backends' CPU is read with psutil only when the server runs on this machine.
        self.local = url.host in (None, "", "127.0.0.1", "localhost", "::1")

    def backends_cpu(self, exclude: int = 0) -> dict[int, float]:
        """CPU seconds of each backend connected to the database (PostgreSQL on this machine only)."""
        if not self.local:
            return {}
        with self.engine.connect() as conn:
            pids = conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = :d"), {"d": self.name}
            ).scalars()
            out = {}
            for pid in pids:
                if pid == exclude:
                    continue
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    if proc.name().startswith("postgres"):
                        t = proc.cpu_times()
                        out[pid] = t.user + t.system
        return out

    def read(self, timeout: float = 15.0) -> int:
        """Once no backend is connected to the database (each flushed its statistics on exit) and it holds."""
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            with self.engine.connect() as conn:
                busy = conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": self.name}
                ).scalar()
                commits = int(
                    conn.execute(
                        text("SELECT xact_commit FROM pg_stat_database WHERE datname = :d"), {"d": self.name}
                    ).scalar()
                    or 0
                )
            if not busy and commits == last:
                return commits
            if time.monotonic() > deadline:
                print(f"  (pg_stat_database read with {busy} backend(s) still connected)", flush=True)
                return commits
            last = commits if not busy else -1
            time.sleep(0.25)

    def close(self) -> None:
        self.engine.dispose()


@dataclass(frozen=True)
class Snapshot:
    at: float
    commits: int
    dispatch_redis: int
    broker: dict[str, float]


def server_pid(server: EmbeddedRedis) -> int:
    return server.process.pid if server.process is not None else 0


@dataclass
class Meter:
    p: Platform
    broker: Broker
    commits: Commits
    # The backend of the benchmark's own progress probe (Platform.count_status): not Waybill's work.
    probe_backend: int = 0

    def cpu(self, *pids: int) -> CpuReading:
        servers = {"dispatch_redis": tree_cpu(server_pid(self.p.redis))}
        if isinstance(self.broker, RedisBroker):
            servers["broker_redis"] = tree_cpu(server_pid(self.broker.server))
        return CpuReading(tree_cpu(*pids), servers, self.commits.backends_cpu(self.probe_backend))

    def probe_pid(self) -> int:
        with self.p.probe_engine().connect() as conn:
            return int(conn.execute(text("SELECT pg_backend_pid()")).scalar() or 0)

    def snapshot(self) -> Snapshot:
        """Every counter, once the previous phase's processes have stopped and their counts arrived."""
        self.probe_backend = 0
        self.p.probe_engine().dispose()  # no connection of ours keeps a backend open
        self.broker.settle()
        return Snapshot(
            time.monotonic(),
            self.commits.read(),
            sum(redis_commands(self.p.redis.url).values()),
            self.broker.counters(),
        )


def per(value: float, units: int) -> float:
    return value / units if units else NAN


def counts_per_unit(before: Snapshot, after: Snapshot, units: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "units": units,
        "phase_s": round(after.at - before.at, 2),
        "sql_commits": per(after.commits - before.commits, units),
        "dispatch_redis_commands": per(after.dispatch_redis - before.dispatch_redis, units),
    }
    for key, value in after.broker.items():
        out[f"broker_{key}"] = per(value - before.broker.get(key, 0), units)
    return out


def cpu_window(a: CpuReading, b: CpuReading, units: int, seconds: float) -> dict[str, Any]:
    """Per unit of the window: the measured processes' CPU, and the servers' (PostgreSQL, Redis)."""
    cpu = cpu_delta(a, b)
    cpu_s = cpu.pop("component")
    return {
        "window_units": units,
        "window_s": round(seconds, 3),
        "cpu_s": round(cpu_s, 3),
        "cpu_ms_per_unit": 1000 * per(cpu_s, units),
        "per_core_per_s": units / cpu_s if cpu_s > 0 else NAN,
        "wall_per_s": units / seconds if seconds > 0 else NAN,
        "cores_busy": cpu_s / seconds if seconds > 0 else NAN,
        **{f"{name}_cpu_ms_per_unit": 1000 * per(value, units) for name, value in cpu.items()},
    }


# --- phases -----------------------------------------------------------------------------------


def wait_count(progress: Callable[[], int], target: int, timeout: float, interval: float = 0.1) -> int:
    """Poll ``progress()`` until it reaches ``target`` or ``timeout`` passes; returns the last count."""
    deadline = time.monotonic() + timeout
    done = progress()
    while done < target and time.monotonic() < deadline:
        time.sleep(interval)
        done = progress()
    return done


def submission_phase(
    m: Meter, key: str, before: Snapshot, *, count: int, clients: int, web_workers: int
) -> tuple[dict[str, Any], Snapshot]:
    p = m.p
    web = p.serve(workers=web_workers, threads=16)
    url, headers = p.base_url + "/v1/tasks", {"Authorization": f"Bearer {key}"}
    try:
        # Warm-up, not in the CPU window: every worker and thread has served once.
        warm = hammer(url, echo_body, clients=clients, total=clients * 10, max_seconds=30, headers=headers)
        c0 = m.cpu(web.pid)
        burst = hammer(url, echo_body, clients=clients, total=count, max_seconds=90, headers=headers)
        c1 = m.cpu(web.pid)
    finally:
        p.stop_one(web)
    after = m.snapshot()
    out = {
        **cpu_window(c0, c1, burst.ok, burst.seconds),
        **counts_per_unit(before, after, warm.ok + burst.ok),
        "errors": warm.errors + burst.errors,
        "first_error": warm.first_error or burst.first_error,
    }
    return out, after


def drain(p: Platform, name: str, queues: str, concurrency: int, target: int, timeout: float) -> int:
    """Run a worker until ``target`` more tasks have succeeded (not measured); returns how many did."""
    start = p.count_status("succeeded")
    worker = p.worker(name, queues=queues, concurrency=concurrency)
    try:
        return wait_count(lambda: p.count_status("succeeded") - start, target, timeout, 0.2)
    finally:
        p.stop_one(worker)


def tasks_phase(
    m: Meter, before: Snapshot, *, expected: int, timeout: float = 150.0
) -> tuple[dict[str, Any], Snapshot]:
    p = m.p
    start = p.count_status("succeeded")

    def progress() -> int:
        return p.count_status("succeeded") - start

    worker = p.worker("tasks", queues="tasks", concurrency=2)
    try:
        wait_count(progress, 1, 60)
        time.sleep(1.0)  # the pool's first connections and imports
        m.probe_backend = m.probe_pid()  # one pooled connection, reused by every progress() call
        a, ca, ta = progress(), m.cpu(worker.pid), time.monotonic()
        b = wait_count(progress, expected, timeout)
        cb, tb = m.cpu(worker.pid), time.monotonic()
    finally:
        p.stop_one(worker)
    after = m.snapshot()
    out = {**cpu_window(ca, cb, b - a, tb - ta), **counts_per_unit(before, after, b), "expected": expected}
    return out, after


def webhooks_phase(
    m: Meter, key: str, *, count: int, clients: int, timeout: float = 150.0
) -> tuple[dict[str, Any], Snapshot]:
    p = m.p
    with Receiver(answer_no_content) as hook:

        def with_webhook(i: int) -> dict[str, Any]:
            return {**echo_body(i), "webhook": {"url": hook.url + "/hook"}}

        # Not measured: the tasks are submitted and run; their deliveries wait in the webhooks queue.
        web = p.serve(workers=2, threads=16)
        try:
            sent = hammer(
                p.base_url + "/v1/tasks",
                with_webhook,
                clients=clients,
                total=count,
                max_seconds=60,
                headers={"Authorization": f"Bearer {key}"},
            ).ok
        finally:
            p.stop_one(web)
        ran = drain(p, "tasks-webhooks", "tasks", 2, sent, timeout)
        before = m.snapshot()
        worker = p.worker("webhooks", queues="webhooks", concurrency=4)
        try:
            # The first 5% open the pool's database and HTTP connections: outside the window.
            wait_count(hook.task_count, max(1, ran // 20), 60)
            a, ca, ta = hook.task_count(), m.cpu(worker.pid), time.monotonic()
            b = wait_count(hook.task_count, ran, timeout, 0.05)
            cb, tb = m.cpu(worker.pid), time.monotonic()
        finally:
            p.stop_one(worker)
        received = len(hook.times())
    after = m.snapshot()
    out = {
        **cpu_window(ca, cb, b - a, tb - ta),
        **counts_per_unit(before, after, b),
        "expected": ran,
        "received": received,
    }
    return out, after


def background_phase(m: Meter, before: Snapshot, *, seconds: float) -> tuple[dict[str, Any], Snapshot]:
    """Beat and the ``webhooks,maintenance`` worker with no work: counts per second of their life."""
    p = m.p
    procs: list[Process] = [p.worker("maintenance", queues="webhooks,maintenance", concurrency=4), p.beat()]
    started = time.monotonic()
    try:
        time.sleep(min(3.0, seconds))  # start-up, outside the CPU window
        c0, t0 = tree_cpu(*(x.pid for x in procs)), time.monotonic()
        time.sleep(seconds)
        c1, t1 = tree_cpu(*(x.pid for x in procs)), time.monotonic()
    finally:
        for proc in procs:
            p.stop_one(proc)
    life = time.monotonic() - started
    after = m.snapshot()
    counts = counts_per_unit(before, after, 1)
    out = {
        "life_s": round(life, 2),
        "cores_busy": (c1 - c0) / (t1 - t0),
        **{k: v / life for k, v in counts.items() if k not in ("units", "phase_s")},
    }
    return out, after


# --- a run ------------------------------------------------------------------------------------


def run(
    broker_kind: str,
    *,
    submissions: int = 1500,
    clients: int = 16,
    webhooks: int = 400,
    background_s: float = 5.0,
    web_workers: int = 2,
    db_kind: str = "postgresql",
    **env: str,
) -> dict[str, Any]:
    """Every phase on one broker, in one platform (one database, one dispatch Redis)."""
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with (
        tempfile.TemporaryDirectory(prefix="waybill-capacity-") as tmp,
        broker(broker_kind, Path(tmp)) as b,
        platform(db_kind, BROKER_URL=b.url, **env) as p,
    ):
        key = p.org("bench-capacity", concurrency_limit=1_000_000).api_key
        commits = Commits(p.database_url)
        try:
            m = Meter(p, b, commits)
            before = m.snapshot()
            print(f"  [{broker_kind}] submission: {submissions:,} echo tasks", flush=True)
            sub, before = submission_phase(
                m, key, before, count=submissions, clients=clients, web_workers=web_workers
            )
            print(f"  [{broker_kind}] tasks: {sub['units']:,} echo tasks", flush=True)
            tasks, before = tasks_phase(m, before, expected=sub["units"])
            hooks: dict[str, Any] = {}
            if webhooks:
                print(f"  [{broker_kind}] webhooks: {webhooks:,} deliveries", flush=True)
                hooks, before = webhooks_phase(m, key, count=webhooks, clients=clients)
            idle: dict[str, Any] = {}
            if background_s:
                print(f"  [{broker_kind}] background: {background_s:g} s", flush=True)
                idle, before = background_phase(m, before, seconds=background_s)
        finally:
            commits.close()
    pipeline = {
        k: sub.get(k, NAN) + tasks.get(k, NAN)
        for k in sub
        if k.startswith(("sql_", "dispatch_", "broker_", "postgresql_")) and k in tasks
    }
    result = {
        "broker": broker_kind,
        "db": db_kind,
        "broker_counts": b.note,
        "web_workers": web_workers,
        "clients": clients,
        "submission": sub,
        "tasks": tasks,
        "webhooks": hooks,
        "background_per_s": idle,
        "submit_and_run_per_task": pipeline,
        "elapsed_s": round(time.monotonic() - started, 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if broker_kind == "rabbitmq" and not (pipeline.get("broker_messages") or 0) > 0:
        result["warning"] = "no message reached the RabbitMQ vhost: do the processes read BROKER_URL?"
    elif broker_kind == "redis" and not (pipeline.get("broker_commands") or 0) > 0:
        result["warning"] = "no command reached the broker's redis-server: do the processes read BROKER_URL?"
    return result


def print_results(results: list[dict[str, Any]]) -> None:
    def g(r: dict[str, Any], phase: str, key: str) -> float:
        value = r.get(phase, {}).get(key, NAN)
        return float(value) if isinstance(value, int | float) else NAN

    rows: list[tuple[str, str, str, int]] = [
        ("web: submissions/s per core (CPU)", "submission", "per_core_per_s", 1),
        ("web: CPU ms per submission", "submission", "cpu_ms_per_unit", 2),
        ("web: submissions/s wall (cores busy)", "submission", "wall_per_s", 1),
        ("tasks worker: tasks/s per core (CPU)", "tasks", "per_core_per_s", 1),
        ("tasks worker: CPU ms per task", "tasks", "cpu_ms_per_unit", 2),
        ("tasks worker: tasks/s wall, concurrency 2", "tasks", "wall_per_s", 1),
        ("webhooks worker: deliveries/s per core (CPU)", "webhooks", "per_core_per_s", 1),
        ("webhooks worker: CPU ms per delivery", "webhooks", "cpu_ms_per_unit", 2),
        ("webhooks worker: deliveries/s wall, concurrency 4", "webhooks", "wall_per_s", 1),
    ]
    counts = [
        ("PostgreSQL CPU ms (the database's backends)", "postgresql_cpu_ms_per_unit"),
        ("dispatch Redis CPU ms", "dispatch_redis_cpu_ms_per_unit"),
        ("broker Redis CPU ms", "broker_redis_cpu_ms_per_unit"),
        ("SQL commits", "sql_commits"),
        ("dispatch Redis commands", "dispatch_redis_commands"),
        ("broker commands (Redis broker)", "broker_commands"),
        ("broker messages published", "broker_messages"),
        ("  of which events", "broker_events"),
    ]
    phases = [
        ("per submission", "submission"),
        ("per task run", "tasks"),
        ("per task, submit + run", "submit_and_run_per_task"),
        ("per delivery", "webhooks"),
        ("per second, background", "background_per_s"),
    ]
    body: list[list[Any]] = []
    for label, phase, key, digits in rows:
        cells: list[Any] = [label]
        for r in results:
            v = g(r, phase, key)
            shown = f"{v:,.{digits}f}" if not math.isnan(v) else "-"
            if key == "wall_per_s" and not math.isnan(v):
                shown += f" ({g(r, phase, 'cores_busy'):.2f})"
            cells.append(shown)
        body.append(cells)
    for name, key in counts:
        for where, phase in phases:
            values = [g(r, phase, key) for r in results]
            if all(math.isnan(v) for v in values):
                continue
            body.append([f"{name} {where}", *values])
    bg = [g(r, "background_per_s", "cores_busy") for r in results]
    body.append(["background: beat + maintenance worker cores busy", *bg])
    table(
        f"Capacity per core, PostgreSQL ({results[0].get('web_workers', 2)} web processes, "
        f"{results[0].get('clients', 16)} clients); per-core figures from CPU time",
        ["measure", *(r["broker"] for r in results)],
        body,
        digits=2,
    )
    for r in results:
        load = r.get("load_average", ["?", "?"])
        print(f"{r['broker']}: {r.get('broker_counts', '')}; load average {load[0]} -> {load[1]}")
        if "warning" in r:
            print(f"WARNING {r['broker']}: {r['warning']}")


# The capacity model of docs/scaling.rst: what a rate of tasks per second
# needs, from one run's measured figures. Every task has a webhook (the
# heavier case), handlers cost nothing of their own (add theirs), processes
# run at most at UTILISATION of their cores, a node gives NODE_CORES cores to
# Waybill's processes.
RATES = (1_000, 10_000)
UTILISATION = 0.7
NODE_CORES = 8


def capacity_model(r: dict[str, Any], rate: float) -> dict[str, float]:
    def f(phase: str, key: str) -> float:
        return float(r.get(phase, {}).get(key) or 0.0)

    both, hook = "submit_and_run_per_task", "webhooks"
    cores = {
        "web": rate * f("submission", "cpu_ms_per_unit") / 1000 / UTILISATION,
        "tasks": rate * f("tasks", "cpu_ms_per_unit") / 1000 / UTILISATION,
        "webhooks": rate * f(hook, "cpu_ms_per_unit") / 1000 / UTILISATION,
    }
    redis_ms = f(both, "dispatch_redis_cpu_ms_per_unit") + f(hook, "dispatch_redis_cpu_ms_per_unit")
    pg_ms = f(both, "postgresql_cpu_ms_per_unit") + f(hook, "postgresql_cpu_ms_per_unit")
    return {
        "rate": rate,
        **{f"{k}_cores": v for k, v in cores.items()},
        "nodes": math.ceil(sum(cores.values()) / NODE_CORES),
        "postgresql_cores": rate * pg_ms / 1000 / UTILISATION,
        "sql_commits_per_s": rate * (f(both, "sql_commits") + f(hook, "sql_commits")),
        # Redis runs commands on one thread, and every dispatch key is in one slot.
        "dispatch_redis_core_share": rate * redis_ms / 1000,
        "dispatch_redis_ceiling_tasks_per_s": UTILISATION * 1000 / redis_ms if redis_ms else NAN,
        "broker_messages_per_s": rate * (f(both, "broker_messages") + f(hook, "broker_messages")),
        "broker_events_per_s": rate * (f(both, "broker_events") + f(hook, "broker_events")),
    }


def print_model(results: list[dict[str, Any]]) -> None:
    rows = [
        ("web cores", "web_cores"),
        ("tasks worker cores", "tasks_cores"),
        ("webhooks worker cores", "webhooks_cores"),
        (f"nodes of {NODE_CORES} cores", "nodes"),
        ("PostgreSQL backend cores", "postgresql_cores"),
        ("SQL commits/s", "sql_commits_per_s"),
        ("dispatch Redis: share of its one core", "dispatch_redis_core_share"),
        (f"dispatch Redis ceiling, tasks/s at {UTILISATION:.0%}", "dispatch_redis_ceiling_tasks_per_s"),
        ("broker messages/s", "broker_messages_per_s"),
        ("  of which Celery events", "broker_events_per_s"),
    ]
    models = [(r["broker"], rate, capacity_model(r, rate)) for r in results for rate in RATES]
    table(
        f"Capacity model: every task with a webhook, no-op handlers, {UTILISATION:.0%} utilisation",
        ["measure", *(f"{broker} {rate:,}/s" for broker, rate, _ in models)],
        [[label, *(m[key] for _, _, m in models)] for label, key in rows],
        digits=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", choices=[*BROKERS, "both"], default="both")
    parser.add_argument("--submissions", type=int, default=1500, help="measured submissions (and tasks)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--webhooks", type=int, default=400, help="webhook deliveries (0: skip)")
    parser.add_argument("--background", type=float, default=5.0, help="seconds of idle beat (0: skip)")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--log-level", default="INFO", help="Waybill's LOG_LEVEL (production default INFO)")
    args = parser.parse_args()
    kinds = available(BROKERS if args.broker == "both" else [args.broker])
    results = []
    for kind in kinds:
        print(f"\n=== capacity ({kind} broker) ===", flush=True)
        results.append(
            run(
                kind,
                submissions=args.submissions,
                clients=args.clients,
                webhooks=args.webhooks,
                background_s=args.background,
                web_workers=args.web_workers,
                LOG_LEVEL=args.log_level,
            )
        )
    print_results(results)
    print_model(results)
    models = {r["broker"]: [capacity_model(r, rate) for rate in RATES] for r in results}
    print(f"written: {write_results('capacity', {'results': results, 'model': models})}")


if __name__ == "__main__":
    main()
