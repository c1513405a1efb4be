"""Many nodes on one machine: three Waybill nodes sharing the database, the broker and Redis.

Each node is what one machine of a deployment runs (the Procfile): its own
gunicorn, tasks worker and webhooks worker (distinct Celery hostnames and
ports, a ``var/`` of its own), and beat on two of the nodes at once: every
job beat schedules (sweep, dispatch step, retention, counter reconciliation)
is idempotent, so two beats cost a second run, never a wrong result
(``docs/scaling.rst``). Mid-run one whole node is SIGKILLed (each of its
process groups) and later started again. Clients submit to any node and, as
careful clients do, send a request again to another node, under the same
idempotency key, when a node does not answer.

At the end the books are checked as the chaos run checks them
(:func:`tests.chaos.harness.check_books`): nothing lost, one result per task,
one charge per task, every webhook accounted for; and fairness across nodes:
a small organization that submits behind a big one's backlog overtakes it.
Every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import select

from app.db import Database
from app.models import Task
from tests.chaos.harness import FAULT_ENV, Receiver, Report, check_books
from tests.support import Org, Process, Stack, make_org, wait_for

ENV = {
    **FAULT_ENV,
    # Twice the task slots of the whole fleet (3 nodes x 2), as docs/dispatch.rst advises.
    "DISPATCH_QUEUE_TARGET": "12",
}


@dataclass
class ScaleConfig:
    nodes: int = 3
    beats: int = 2
    tasks: int = 240  # the big organization's; the steady one sends a third of it, the late one 12
    clients: int = 8
    node_kills: int = 1
    down_seconds: float = 4.0
    max_seconds: float = 180.0
    seed: int = 11


@dataclass
class ScaleReport(Report):
    nodes: int = 0
    beats: int = 0
    node_kills: int = 0
    retried_elsewhere: int = 0  # submissions sent again to another node after no answer
    finished_per_node: dict[str, int] = field(default_factory=dict)
    beats_that_swept: int = 0
    late_tasks: int = 0
    # For each task of the late organization: the big one's tasks that were
    # waiting when it was submitted, and those of them that started before it.
    late_backlog_min: int = 0
    late_overtaken_by_max: int = 0

    def line(self) -> str:
        return (
            f"{self.nodes} nodes ({self.beats} beats), {self.node_kills} node kills, {self.tasks_accepted} "
            f"tasks on {self.broker}/{self.database}: {self.lost + self.not_final} lost, "
            f"{self.duplicate_results} duplicate results, {self.double_charges} double charges, "
            f"{self.webhooks_accounted}/{self.webhooks_expected} webhooks; finished per node "
            f"{self.finished_per_node}; late organization: backlog >= {self.late_backlog_min}, "
            f"overtaken by <= {self.late_overtaken_by_max}"
        )


@dataclass
class Node:
    name: str
    stack: Stack
    procs: list[Process]

    @property
    def base_url(self) -> str:
        return self.stack.base_url

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()

    def start_again(self) -> None:
        for proc in self.procs:
            proc.start()


def _node(i: int, root: Path, env: dict[str, str], db: Database, beat: bool) -> Node:
    name = f"node{i}"
    log_dir = root / name
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(env={**env, "VAR_DIR": str(log_dir / "var")}, log_dir=log_dir, db=db, wait_ready=False)
    web = stack.web(workers=2, threads=8)
    procs = [
        web,
        stack.worker(f"{name}-tasks", queues="tasks", concurrency=2),
        stack.worker(f"{name}-webhooks", queues="webhooks,maintenance", concurrency=2),
    ]
    if beat:
        procs.append(stack.beat())
    return Node(name, stack, procs)


def _wait_ready(proc: Process) -> None:
    wait_for(lambda: "ready." in proc.output() or not proc.alive(), 90, f"{proc.name} ready")
    assert proc.alive(), proc.output()[-3000:]


@contextlib.contextmanager
def nodes(root: Path, cfg: ScaleConfig, env: dict[str, str], db: Database) -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        for i in range(1, cfg.nodes + 1):
            started.append(_node(i, root, {**env, **ENV}, db, beat=i <= cfg.beats))
        for node in started:
            for proc in node.procs[1:3]:
                _wait_ready(proc)
        yield started
    finally:
        for node in started:
            node.stack.stop()


def _submit(
    bases: list[str],
    api_key: str,
    bodies: list[dict[str, Any]],
    accepted: dict[str, str],
    report: ScaleReport,
    stop_at: float,
    rng: random.Random,
    pace: float = 0.0,
) -> None:
    """Each body to some node, under its idempotency key; no answer: the same request to another."""
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {api_key}"
    for body in bodies:
        time.sleep(pace)
        node = rng.randrange(len(bases))
        while time.monotonic() < stop_at:
            try:
                r = s.post(bases[node] + "/v1/tasks", json=body, timeout=10)
            except requests.RequestException:
                node = (node + 1) % len(bases)
                report.retried_elsewhere += 1
                time.sleep(0.1)
                continue
            if r.status_code in (200, 202):
                accepted[body["idempotencyKey"]] = r.json()["taskId"]
                break
            if r.status_code >= 500 or r.status_code == 429:
                node = (node + 1) % len(bases)
                time.sleep(0.2)
                continue
            raise AssertionError(f"unexpected {r.status_code}: {r.text[:300]}")


def _bodies(
    prefix: str, count: int, receiver_url: str, rng: random.Random, hooks: float
) -> list[dict[str, Any]]:
    bodies = []
    for i in range(count):
        body: dict[str, Any] = {"idempotencyKey": f"{prefix}-{i}"}
        if rng.random() < 0.5:
            body.update(type="sleep", input={"seconds": rng.choice([0.05, 0.1, 0.2])})
        else:
            body.update(type="echo", input={"i": i})
        if rng.random() < hooks:
            body["webhook"] = {"url": receiver_url + rng.choice(["/ok", "/ok", "/flaky", "/drop", "/slow"])}
        bodies.append(body)
    return bodies


def run_scale(root: Path, cfg: ScaleConfig, env: dict[str, str], db: Database) -> ScaleReport:
    rng = random.Random(cfg.seed)
    report = ScaleReport(nodes=cfg.nodes, beats=cfg.beats)
    report.database = db.engine.dialect.name
    report.broker = "rabbitmq" if env.get("BROKER_URL", "").startswith("amqp") else "redis"
    receiver = Receiver(slow_seconds=2.0)
    started = time.monotonic()
    stop_at = started + cfg.max_seconds * 0.6
    try:
        with nodes(root, cfg, env, db) as fleet:
            bases = [n.base_url for n in fleet]
            # The big one may use every task slot of the fleet; the others too.
            big = make_org(db, "big", credits=cfg.tasks * 10, concurrency_limit=6)
            steady = make_org(db, "steady", credits=cfg.tasks * 10, concurrency_limit=6)
            late = make_org(db, "late", credits=1000, concurrency_limit=6)
            accepted: dict[str, str] = {}
            big_bodies = _bodies("big", cfg.tasks, receiver.url, rng, hooks=0.1)
            steady_bodies = _bodies("steady", cfg.tasks // 3, receiver.url, rng, hooks=0.5)

            def senders(
                org: Org, bodies: list[dict[str, Any]], count: int, seed: int, pace: float = 0.0
            ) -> list[threading.Thread]:
                return [
                    threading.Thread(
                        target=_submit,
                        args=(bases, org.api_key, bodies[k::count], accepted, report, stop_at),
                        kwargs={"rng": random.Random(seed + k), "pace": pace},
                        daemon=True,
                    )
                    for k in range(count)
                ]

            threads = senders(big, big_bodies, cfg.clients, 100)
            for t in threads:
                t.start()
            for t in threads:  # the big backlog is in
                t.join(max(1.0, stop_at - time.monotonic()))
            # Then, while the nodes die: a steady stream (paced so that it
            # outlasts a node's death, whose submissions go to another node)
            # and the late organization's few tasks.
            late_bodies = [
                {"idempotencyKey": f"late-{i}", "type": "sleep", "input": {"seconds": 0.05}}
                for i in range(12)
            ]
            pace = (cfg.down_seconds + 3.0) * cfg.node_kills * 2 / max(1, len(steady_bodies))
            threads = senders(steady, steady_bodies, 2, 200, pace) + senders(late, late_bodies, 4, 300)
            for t in threads:
                t.start()
            # Whole nodes die (never the first: its beat and API stay) and come back.
            for k in range(cfg.node_kills):
                time.sleep(rng.uniform(1.0, 2.0))
                victim = fleet[1 + k % (len(fleet) - 1)]
                victim.kill()
                report.node_kills += 1
                report.timeline.append(f"{time.monotonic() - started:.1f} s {victim.name} killed")
                time.sleep(cfg.down_seconds)
                victim.start_again()
                report.timeline.append(f"{time.monotonic() - started:.1f} s {victim.name} started again")
            for t in threads:
                t.join(max(1.0, stop_at - time.monotonic() + 10))
            report.tasks_accepted = len(accepted)
            org_ids = [big.id, steady.id, late.id]
            _drain(db, org_ids, started + cfg.max_seconds)
            check_books(report, db, org_ids, list(accepted.values()), receiver)
            _fairness(report, db, big.id, late.id)
            _from_logs(report, fleet)
    finally:
        receiver.close()
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _drain(db: Database, org_ids: list[str], until: float) -> None:
    from sqlalchemy import func

    from app.models import WebhookDelivery

    while time.monotonic() < until:
        with db.read_session() as s:
            open_tasks = s.execute(
                select(func.count()).where(
                    Task.organization_id.in_(org_ids), Task.status.in_(["queued", "running"])
                )
            ).scalar_one()
            pending = s.execute(select(func.count()).where(WebhookDelivery.status == "pending")).scalar_one()
        if open_tasks == 0 and pending == 0:
            return
        time.sleep(0.5)


def _fairness(report: ScaleReport, db: Database, big_id: str, late_id: str) -> None:
    """How many of the big organization's waiting tasks started before each late one."""
    with db.read_session() as s:
        rows = s.execute(
            select(Task.organization_id, Task.created_at, Task.started_at).where(
                Task.organization_id.in_([big_id, late_id]), Task.started_at.is_not(None)
            )
        ).all()
    big = [(created, started) for org, created, started in rows if org == big_id and started]
    late = [(created, started) for org, created, started in rows if org == late_id and started]
    report.late_tasks = len(late)
    backlogs, overtaken = [], []
    for created, started in late:
        waiting = [b for b in big if b[0] < created and b[1] > created]
        backlogs.append(len(waiting))
        overtaken.append(sum(1 for b in waiting if b[1] < started))
    report.late_backlog_min = min(backlogs, default=0)
    report.late_overtaken_by_max = max(overtaken, default=0)


def _from_logs(report: ScaleReport, fleet: list[Node]) -> None:
    finished: Counter[str] = Counter()
    for node in fleet:
        count = 0
        for proc in node.procs:
            for record in proc.log_records():
                if record.get("event") == "task.finished":
                    finished[str(record.get("task_id", ""))] += 1
                    count += 1
            if proc.name == "beat" and "waybill.maintenance.sweep" in proc.output():
                report.beats_that_swept += 1
        report.finished_per_node[node.name] = count
    report.duplicate_results += sum(n - 1 for n in finished.values() if n > 1)


def write(report: ScaleReport, path: Path) -> None:
    from dataclasses import asdict

    path.write_text(json.dumps(asdict(report), indent=2))
