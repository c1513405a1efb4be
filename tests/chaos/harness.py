"""The chaos run: real processes, a bounded workload, injected faults, then invariants from SQL.

Everything runs on 127.0.0.1 and belongs to the run: its own Redis (killed and
restarted empty), its own PostgreSQL cluster (initdb in a temporary directory,
restarted mid-run; needs the server binaries and root, else SQLite is used and
no PostgreSQL fault is injected), gunicorn, a task worker, a webhooks worker,
beat, and a webhook receiver with misbehaving endpoints. Every loop is bounded
in count and time.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import func, select

from app.db import Database
from app.embedded_redis import EmbeddedRedis, free_port
from app.migrate import upgrade
from app.models import CreditEntry, Organization, Task, WebhookAttempt, WebhookDelivery
from app.services import organizations
from tests.processes import Process as Proc


@dataclass
class ChaosConfig:
    tasks: int = 300
    clients: int = 8
    worker_kills: int = 3
    child_kills: int = 3
    redis_restarts: int = 1
    postgres_restarts: int = 1
    crash_after_commit: float = 0.02
    webhook_share: float = 0.3
    max_seconds: float = 240.0
    seed: int = 7


# -- PostgreSQL of our own ------------------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster, run as the ``postgres`` user (the server refuses root)."""

    def __init__(self) -> None:
        bindir = _pg_bin()
        assert bindir is not None
        self.bin = bindir
        # Its own directory: pytest's temporary directories are closed to other users.
        root = Path(tempfile.mkdtemp(prefix="waybill-chaos-pg-"))
        root.chmod(0o755)
        self.root = root
        self.dir = root / "pgdata"
        self.sock = root / "pgsock"
        self.port = free_port()
        self.log = root / "postgres.log"

    @staticmethod
    def available() -> bool:
        return _pg_bin() is not None and os.geteuid() == 0 and shutil.which("runuser") is not None

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=120
        )

    def init(self) -> str:
        for d in (self.dir, self.sock):
            d.mkdir(parents=True)
            shutil.chown(d, "postgres", "postgres")
        self.log.touch()
        shutil.chown(self.log, "postgres", "postgres")
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.dir), "-A", "trust", "-U", "postgres")
        self.start()
        self._as_postgres(
            str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "chaos"
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/chaos"

    def start(self) -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.dir),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.dir), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# -- the webhook receiver ---------------------------------------------------------


class Receiver:
    """Endpoints: /ok, /flaky (500 twice, then 200), /slow (first answer too late), /drop (first
    attempt cut without an answer), /down (503 always: ends ``failed`` after 5 attempts)."""

    def __init__(self, slow_seconds: float) -> None:
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.seen: Counter[str] = Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                wid = self.headers.get("webhook-id", "")
                with receiver.lock:
                    receiver.seen[wid] += 1
                    n = receiver.seen[wid]
                    try:
                        task_id = json.loads(body)["data"]["taskId"]
                    except (ValueError, KeyError):
                        task_id = ""
                    receiver.log.append({"path": self.path, "webhook_id": wid, "task_id": task_id, "n": n})
                if self.path == "/drop" and n == 1:
                    self.connection.shutdown(2)
                    return
                if self.path == "/slow" and n == 1:
                    time.sleep(slow_seconds)
                status = 200
                if (self.path == "/flaky" and n <= 2) or self.path == "/down":
                    status = 500 if self.path == "/flaky" else 503
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- processes ----------------------------------------------------------------------


@dataclass
class Report:
    database: str = ""
    tasks_accepted: int = 0
    worker_kills: int = 0
    child_kills: int = 0
    redis_restarts: int = 0
    postgres_restarts: int = 0
    web_crashes: int = 0
    supervisor_restarts: int = 0
    cancels: int = 0
    lost: int = 0
    not_final: int = 0
    duplicate_results: int = 0
    double_charges: int = 0
    wrong_refunds: int = 0
    ledger_mismatch: int = 0
    webhooks_expected: int = 0
    webhooks_accounted: int = 0
    webhook_id_changes: int = 0
    attempt_log_errors: int = 0
    secrets_in_logs: int = 0
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not (
            self.lost
            or self.not_final
            or self.duplicate_results
            or self.double_charges
            or self.wrong_refunds
            or self.ledger_mismatch
            or self.webhook_id_changes
            or self.attempt_log_errors
            or self.secrets_in_logs
            or self.webhooks_accounted != self.webhooks_expected
        )

    def line(self) -> str:
        return (
            f"{self.tasks_accepted} tasks, {self.worker_kills + self.child_kills} worker kills, "
            f"{self.redis_restarts} Redis restarts, {self.postgres_restarts} PostgreSQL restarts, "
            f"{self.supervisor_restarts} supervisor restarts, {self.cancels} cancels, "
            f"{self.web_crashes} web crashes after commit: {self.lost + self.not_final} lost, "
            f"{self.duplicate_results} duplicate results, {self.double_charges} double charges, "
            f"{self.webhooks_accounted}/{self.webhooks_expected} webhooks accounted for"
        )


def _client(
    base: str, api_key: str, bodies: list[dict[str, Any]], accepted: dict[str, str], stop_at: float
) -> None:
    """Submits with idempotency keys and retries through faults, as a careful client would."""
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {api_key}"
    for body in bodies:
        while time.monotonic() < stop_at:
            try:
                r = s.post(base + "/v1/tasks", json=body, timeout=15)
            except requests.RequestException:
                time.sleep(0.2)
                continue
            if r.status_code in (200, 202):
                accepted[body["idempotencyKey"]] = r.json()["taskId"]
                break
            if r.status_code >= 500 or r.status_code == 429:
                time.sleep(0.3)
                continue
            raise AssertionError(f"unexpected {r.status_code}: {r.text[:300]}")


@contextlib.contextmanager
def _platform(root: Path, cfg: ChaosConfig) -> Iterator[dict[str, Any]]:
    pg: PrivatePostgres | None = None
    if cfg.postgres_restarts and PrivatePostgres.available():
        pg = PrivatePostgres()
        url = pg.init()
    else:
        url = f"sqlite:///{root / 'chaos.sqlite3'}"
    upgrade(url)
    redis = EmbeddedRedis(root / "redis", persist=False).start()
    receiver = Receiver(slow_seconds=3.0)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": redis.url,
        "VAR_DIR": str(root / "var"),
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "FETCH_ALLOW_PRIVATE": "true",
        "WEBHOOK_RETRY_BASE_SECONDS": "0.3",
        "WEBHOOK_TIMEOUT_SECONDS": "1.5",
        "TASK_LEASE_SECONDS": "3",
        "SWEEP_INTERVAL_SECONDS": "1",
        "SWEEP_GRACE_SECONDS": "2",
        "DISPATCH_RELEASE_LEASE_SECONDS": "15",
        "DISPATCH_QUEUE_TARGET": "8",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    port = free_port()
    py = sys.executable
    procs = {
        "web": Proc(
            "web",
            [
                py,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
                "--threads",
                "8",
                "app.wsgi:app",
            ],
            {**env, "FAULT_CRASH_AFTER_COMMIT": str(cfg.crash_after_commit), "FAULT_INJECTION": "1"},
            root,
        ),
        "worker": Proc(
            "worker",
            [
                py,
                "-m",
                "celery",
                "-A",
                "workers.main",
                "worker",
                "--queues",
                "tasks",
                "--concurrency",
                "2",
                "--hostname",
                "tasks@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ],
            env,
            root,
        ),
        "webhooks": Proc(
            "webhooks",
            [
                py,
                "-m",
                "celery",
                "-A",
                "workers.main",
                "worker",
                "--queues",
                "webhooks,maintenance",
                "--concurrency",
                "4",
                "--hostname",
                "webhooks@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ],
            env,
            root,
        ),
        "beat": Proc(
            "beat",
            [
                py,
                "-m",
                "celery",
                "-A",
                "workers.main",
                "beat",
                "--schedule",
                str(root / "beat-schedule"),
                "--loglevel",
                "INFO",
            ],
            env,
            root,
        ),
    }
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(base + "/healthz", timeout=1).status_code == 200:
                break
        time.sleep(0.1)
    try:
        yield {
            "url": url,
            "pg": pg,
            "redis": redis,
            "receiver": receiver,
            "procs": procs,
            "base": base,
            "root": root,
        }
    finally:
        for proc in procs.values():
            proc.stop()
        receiver.close()
        redis.stop()
        if pg is not None:
            pg.remove()


def run_chaos(root: Path, cfg: ChaosConfig) -> Report:
    rng = random.Random(cfg.seed)
    started = time.monotonic()
    report = Report()
    with _platform(root, cfg) as p:
        report.database = "postgresql" if p["pg"] else "sqlite"
        db = Database(p["url"])
        with db.session() as s:
            created = organizations.create_organization(
                s, "chaos", credits=cfg.tasks * 10, queue_limit=100_000, concurrency_limit=50
            )
            org_id, api_key, secret = (
                created.organization.id,
                created.key.api_key,
                created.organization.webhook_secret,
            )
        bodies: list[dict[str, Any]] = []
        for i in range(cfg.tasks):
            body: dict[str, Any] = {"idempotencyKey": f"chaos-{i}"}
            roll = rng.random()
            if roll < 0.25:
                body.update(type="sleep", input={"seconds": rng.choice([0.05, 0.1, 0.3])})
            elif roll < 0.30:
                # Fails (nothing listens there): exercises refunds under faults.
                body.update(type="http.fetch", input={"url": "http://127.0.0.1:1/", "timeoutSeconds": 1})
            else:
                body.update(type="echo", input={"i": i})
            if rng.random() < cfg.webhook_share:
                path = rng.choice(["/ok", "/ok", "/flaky", "/slow", "/drop", "/down"])
                body["webhook"] = {"url": p["receiver"].url + path}
            bodies.append(body)
        accepted: dict[str, str] = {}
        stop_at = started + cfg.max_seconds * 0.6
        chunks = [bodies[i :: cfg.clients] for i in range(cfg.clients)]
        clients = [
            threading.Thread(target=_client, args=(p["base"], api_key, chunk, accepted, stop_at), daemon=True)
            for chunk in chunks
        ]
        for t in clients:
            t.start()

        # A process manager (systemd, Kubernetes, ...) restarts a process that
        # exits; a Celery worker can exit on its own when Redis vanishes
        # (kombu: "Unrecoverable error" while restoring unacked messages).
        procs: dict[str, Proc] = p["procs"]
        supervising = threading.Event()
        supervising.set()
        fault_lock = threading.Lock()

        def supervise() -> None:
            while supervising.is_set():
                with fault_lock:
                    for proc in procs.values():
                        if proc.exited():
                            proc.start()
                            report.supervisor_restarts += 1
                time.sleep(0.5)

        supervisor = threading.Thread(target=supervise, daemon=True)
        supervisor.start()

        # A client that cancels about 5% of the accepted tasks, whatever state they are in.
        def canceller() -> None:
            s = requests.Session()
            s.headers["Authorization"] = f"Bearer {api_key}"
            crng = random.Random(cfg.seed + 1)
            done: set[str] = set()
            while time.monotonic() < stop_at:
                time.sleep(0.05)
                candidates = [t for t in list(accepted.values()) if t not in done]
                if not candidates or crng.random() > 0.5:
                    continue
                task_id = crng.choice(candidates)
                done.add(task_id)
                if crng.random() < 0.1:
                    with contextlib.suppress(requests.RequestException):
                        r = s.post(f"{p['base']}/v1/tasks/{task_id}/cancel", timeout=15)
                        if r.status_code == 200:
                            report.cancels += 1

        threading.Thread(target=canceller, daemon=True).start()

        # Faults, spread over the submission phase.
        faults = (
            ["worker"] * cfg.worker_kills
            + ["child"] * cfg.child_kills
            + ["redis"] * cfg.redis_restarts
            + (["postgres"] * cfg.postgres_restarts if p["pg"] else [])
        )
        rng.shuffle(faults)
        for fault in faults:
            time.sleep(rng.uniform(1.0, 3.0))
            if fault == "worker":
                victim = procs[rng.choice(["worker", "webhooks"])]
                with fault_lock:
                    victim.kill()
                    time.sleep(0.5)
                    victim.start()
                report.worker_kills += 1
            elif fault == "child":
                if procs["worker"].kill_a_child():
                    report.child_kills += 1
            elif fault == "redis":
                redis: EmbeddedRedis = p["redis"]
                redis.kill()
                time.sleep(1.0)
                restarted = EmbeddedRedis(redis.data_dir, port=redis.port, persist=False).start()
                redis.process = restarted.process
                report.redis_restarts += 1
            elif fault == "postgres":
                p["pg"].stop("fast")
                time.sleep(2.0)
                p["pg"].start()
                report.postgres_restarts += 1
        for t in clients:
            t.join(max(1.0, stop_at - time.monotonic() + 20))
        report.tasks_accepted = len(accepted)

        # Drain: every task final and every delivery settled, or the deadline.
        drain_until = started + cfg.max_seconds
        while time.monotonic() < drain_until:
            with db.session() as s:
                open_tasks = s.execute(
                    select(func.count()).where(
                        Task.organization_id == org_id, Task.status.in_(["queued", "running"])
                    )
                ).scalar_one()
                pending = s.execute(
                    select(func.count()).where(WebhookDelivery.status == "pending")
                ).scalar_one()
            if open_tasks == 0 and pending == 0:
                break
            time.sleep(0.5)
        supervising.clear()
        supervisor.join(5)
        report.seconds = round(time.monotonic() - started, 1)
        _check(report, db, org_id, accepted, p["receiver"], bodies)
        report.web_crashes = (root / "web.log").read_text(errors="replace").count("exited with code 70")
        logs = "".join(Path(proc.log_path).read_text(errors="replace") for proc in procs.values())
        # A result is recorded once per task: the workers' "task.finished" lines say so.
        finished: Counter[str] = Counter()
        for line in logs.splitlines():
            if line.startswith("{") and '"task.finished"' in line:
                with contextlib.suppress(ValueError):
                    finished[json.loads(line).get("task_id", "")] += 1
        report.duplicate_results += sum(n - 1 for n in finished.values() if n > 1)
        report.secrets_in_logs = (
            logs.count(api_key) + logs.count(secret) + logs.count(secret.removeprefix("whsec_"))
        )
        db.dispose()
    return report


def _check(
    report: Report,
    db: Database,
    org_id: str,
    accepted: dict[str, str],
    receiver: Receiver,
    bodies: list[dict[str, Any]],
) -> None:
    with db.session() as s:
        rows = {t.id: t for t in s.execute(select(Task).where(Task.organization_id == org_id)).scalars()}
        report.statuses = dict(Counter(t.status for t in rows.values()))
        report.lost = sum(1 for task_id in accepted.values() if task_id not in rows)
        report.not_final = sum(1 for t in rows.values() if t.status in ("queued", "running"))
        if report.lost:
            report.problems.append(
                f"accepted but missing: {[i for i in accepted.values() if i not in rows][:5]}"
            )
        if report.not_final:
            report.problems.append(
                f"not final: {[t.id for t in rows.values() if t.status in ('queued', 'running')][:5]}"
            )
        by_key = Counter(t.idempotency_key for t in rows.values())
        report.duplicate_results += sum(
            n - 1 for n in by_key.values() if n > 1
        )  # one task per accepted request
        kinds: dict[str, Counter[str]] = defaultdict(Counter)
        for task_id, kind in s.execute(
            select(CreditEntry.task_id, CreditEntry.kind).where(CreditEntry.organization_id == org_id)
        ):
            if task_id:
                kinds[task_id][kind] += 1
        for t in rows.values():
            k = kinds[t.id]
            if k["reserve"] != 1:
                report.double_charges += 1
            if k["refund"] != (1 if t.status in ("failed", "canceled") else 0):
                report.wrong_refunds += 1
            if t.status == "succeeded" and t.result is None and t.type == "echo":
                report.duplicate_results += 1
        org = s.get(Organization, org_id)
        ledger = s.execute(
            select(func.coalesce(func.sum(CreditEntry.amount), 0)).where(
                CreditEntry.organization_id == org_id
            )
        ).scalar_one()
        assert org is not None
        report.ledger_mismatch = int(org.credits != ledger)
        expected = [
            t for t in rows.values() if t.webhook_url and t.status in ("succeeded", "failed", "canceled")
        ]
        report.webhooks_expected = len(expected)
        deliveries = {d.task_id: d for d in s.execute(select(WebhookDelivery)).scalars()}
        received_ids: dict[str, set[str]] = defaultdict(set)
        for entry in receiver.log:
            if entry["task_id"]:
                received_ids[entry["task_id"]].add(entry["webhook_id"])
        for t in expected:
            d = deliveries.get(t.id)
            if d is None:
                report.problems.append(f"no delivery for {t.id}")
                continue
            numbers = sorted(
                s.execute(select(WebhookAttempt.attempt).where(WebhookAttempt.delivery_id == d.id)).scalars()
            )
            if numbers != list(range(1, d.attempts + 1)):
                report.attempt_log_errors += 1
                report.problems.append(f"attempt log of {d.id}: {numbers} vs {d.attempts}")
            if received_ids.get(t.id, {d.id}) != {d.id}:
                report.webhook_id_changes += 1
            settled = d.status == "delivered" and d.id in received_ids.get(t.id, set())
            settled = settled or (d.status == "failed" and d.attempts == d.max_attempts)
            if settled:
                report.webhooks_accounted += 1
            else:
                report.problems.append(f"delivery {d.id} {d.status} after {d.attempts} attempts")
