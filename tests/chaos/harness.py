"""The chaos run: real processes, a bounded workload, injected faults, then invariants from SQL.

Everything runs on 127.0.0.1 and belongs to the run: its own Redis (killed and
restarted empty, and rolled back to an older snapshot of itself), its own
PostgreSQL cluster (initdb in a temporary directory, restarted mid-run; needs
the server binaries and root, else SQLite is used and no PostgreSQL fault is
injected), gunicorn, a task worker, a webhooks worker, beat, and a webhook
receiver with misbehaving endpoints. A share of the submissions are hostile
(:func:`poison_items`), sent by a second organization so that what they stored
and charged can be told apart from the rest; a third one, limited to one task
at a time, holds the backlog a Redis rollback erases. Every loop is bounded in
count and time.
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

import redis as redis_client
import requests
from sqlalchemy import func, select

from app.db import Database
from app.dispatch.keys import EPOCH, KNOWN, LEASES
from app.embedded_redis import EmbeddedRedis, free_port
from app.migrate import upgrade
from app.models import CreditEntry, Organization, Task, WebhookAttempt, WebhookDelivery
from app.services import organizations
from config.settings import Settings
from tests.processes import Process as Proc
from tests.support.rabbitmq import AMQP_URL_ENV, rabbitmqctl, vhost, vhost_of

# Settings of a run under faults (this one and tests/scale's): short leases,
# sweeps and retries, so that what a fault drops comes back within the run.
FAULT_ENV = {
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


@dataclass
class ChaosConfig:
    tasks: int = 300
    clients: int = 8
    worker_kills: int = 3
    child_kills: int = 3
    redis_restarts: int = 1
    redis_rollbacks: int = 1
    # Tasks submitted right after each snapshot to an organization that runs one
    # at a time: some still wait, confirmed by the sweep, when Redis goes back.
    rollback_backlog: int = 30
    postgres_restarts: int = 1
    # With RabbitMQ as the broker (TEST_AMQP_URL): every connection of the
    # run's virtual host closed by the broker, workers' and publishers' alike.
    broker_disconnects: int = 1
    crash_after_commit: float = 0.02
    webhook_share: float = 0.3
    # Hostile submissions, as a share of `tasks` (at least one of each kind when above 0).
    poison_share: float = 0.05
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

# Where the receiver sees a delivery to ``/café``: Waybill sends a non-ASCII
# path percent-encoded as UTF-8 (the request line is ASCII).
CAFE_PATH = "/café"
CAFE_PATH_SENT = "/caf%C3%A9"
# What GET /nul answers: NUL bytes that http.fetch must turn into U+FFFD.
NUL_BODY = b"nul:\x00:end\x00"


class Receiver:
    """Endpoints: /ok, /flaky (500 twice, then 200), /slow (first answer too late), /drop (first
    attempt cut without an answer), /down (503 always: ends ``failed`` after 5 attempts); any
    other path, /café among them, answers 200. GET /nul answers a body holding NUL bytes."""

    def __init__(self, slow_seconds: float) -> None:
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.seen: Counter[str] = Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = NUL_BODY if self.path == "/nul" else b""
                with contextlib.suppress(OSError):
                    self.send_response(200 if self.path == "/nul" else 404)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

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


# -- hostile submissions --------------------------------------------------------------

# Each kind, and the status the API must answer it: the 4xx of its refusal, or
# 202 (accepted; then it must end like any task). The two "control" kinds sit
# just inside the limits the others break (32 levels; a chunked body under
# MAX_BODY_BYTES): they show that the refusals are about the poison, not about
# nesting or chunked framing as such.
POISON_KINDS: dict[str, int] = {
    "echo_depth_33": 400,
    "echo_depth_5000": 400,
    "nul_in_input": 400,
    "nul_in_metadata": 400,
    "nul_in_key": 400,
    "surrogate_in_input": 400,
    "surrogate_in_metadata": 400,
    "surrogate_in_key": 400,
    "sleep_seconds_string": 400,
    "chunked_over_limit": 413,
    "webhook_cafe": 202,
    "fetch_nul_body": 202,
    "control_depth_32": 202,
    "control_chunked_small": 202,
}
PROBLEM_UNAVAILABLE = "urn:waybill:problem:unavailable"


@dataclass(frozen=True)
class PoisonItem:
    kind: str
    body: bytes  # the raw request body, sent as application/json
    expect: int
    chunked: bool = False


@dataclass
class PoisonResult:
    item: PoisonItem
    status: int  # the final answer's status; 0: no answer before the run's bound
    problem_json: bool
    task_id: str | None
    detail: str
    no_answer: int  # tries that got no answer (connection closed, timeout) and were sent again
    unavailable: int  # tries answered 503 "database unavailable" (a PostgreSQL restart) and sent again


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


def _poison(kind: str, key: str, receiver_url: str, max_body: int) -> PoisonItem:
    def js(**body: Any) -> bytes:
        # json.dumps escapes (ensure_ascii): U+0000 and a lone surrogate reach
        # the server as the six characters \u0000 and \ud800 of the raw JSON.
        return json.dumps(body).encode("ascii")

    expect = POISON_KINDS[kind]
    echo: dict[str, Any] = {"type": "echo", "idempotencyKey": key}
    match kind:
        case "echo_depth_33":
            return PoisonItem(kind, js(**echo, input=_nested(33)), expect)
        case "control_depth_32":
            return PoisonItem(kind, js(**echo, input=_nested(32)), expect)
        case "echo_depth_5000":
            # By hand: json.dumps would itself recurse 5,000 levels.
            opened, closed = "[" * 5000, "]" * 5000
            raw = f'{{"type": "echo", "idempotencyKey": "{key}", "input": {opened}{closed}}}'
            return PoisonItem(kind, raw.encode("ascii"), expect)
        case "nul_in_input":
            return PoisonItem(kind, js(**echo, input={"s": "a\x00b"}), expect)
        case "nul_in_metadata":
            return PoisonItem(kind, js(**echo, input={"s": "ok"}, metadata={"note": "a\x00b"}), expect)
        case "nul_in_key":
            return PoisonItem(kind, js(type="echo", input={"s": "ok"}, idempotencyKey=key + "\x00"), expect)
        case "surrogate_in_input":
            return PoisonItem(kind, js(**echo, input={"s": "a\ud800b"}), expect)
        case "surrogate_in_metadata":
            return PoisonItem(kind, js(**echo, input={"s": "ok"}, metadata={"note": "a\ud800b"}), expect)
        case "surrogate_in_key":
            return PoisonItem(kind, js(type="echo", input={"s": "ok"}, idempotencyKey=key + "\ud800"), expect)
        case "sleep_seconds_string":
            return PoisonItem(kind, js(type="sleep", input={"seconds": "5"}, idempotencyKey=key), expect)
        case "chunked_over_limit":
            body = js(**echo, input={"pad": "x" * (max_body + 65536)})
            return PoisonItem(kind, body, expect, chunked=True)
        case "control_chunked_small":
            return PoisonItem(kind, js(**echo, input={"pad": "x" * 2000}), expect, chunked=True)
        case "webhook_cafe":
            body = js(**echo, input={"s": "café"}, webhook={"url": receiver_url + CAFE_PATH})
            return PoisonItem(kind, body, expect)
        case "fetch_nul_body":
            fetch = {"url": receiver_url + "/nul", "timeoutSeconds": 5}
            return PoisonItem(kind, js(type="http.fetch", input=fetch, idempotencyKey=key), expect)
    raise ValueError(kind)


def poison_items(count: int, receiver_url: str, max_body: int, rng: random.Random) -> list[PoisonItem]:
    """``count`` hostile submissions (each kind at least once when ``count`` > 0), unique keys."""
    if count <= 0:
        return []
    kinds = list(POISON_KINDS)
    kinds += [rng.choice(kinds) for _ in range(count - len(kinds))]
    return [_poison(kind, f"poison-{i}", receiver_url, max_body) for i, kind in enumerate(kinds)]


def _chunks(body: bytes, size: int = 65536) -> Iterator[bytes]:
    # A generator: requests sends it with Transfer-Encoding: chunked and no Content-Length.
    for i in range(0, len(body), size):
        yield body[i : i + size]


def _json(r: requests.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} (a bad answer is reported, not raised in a client thread)."""
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _is_problem(r: requests.Response) -> bool:
    if not r.headers.get("Content-Type", "").startswith("application/problem+json"):
        return False
    return _json(r).get("status") == r.status_code


def _post_poison(s: requests.Session, base: str, item: PoisonItem) -> requests.Response:
    return s.post(
        base + "/v1/tasks",
        data=_chunks(item.body) if item.chunked else item.body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


def _send_poison(s: requests.Session, base: str, item: PoisonItem, stop_at: float) -> PoisonResult:
    """Send one hostile submission as the other clients send theirs: again after no answer or a 503.

    A try may go unanswered without the request being at fault: a web process
    killed after another request's commit takes its connections with it. The
    quiet replay after the run (:func:`_replay_refusals`) holds the refusals
    to the strict rule. A 503 is sent again only when it is the documented
    "database unavailable" (PostgreSQL restarting); any other 5xx is the answer.
    """
    no_answer = unavailable = 0
    while time.monotonic() < stop_at and no_answer + unavailable < 40:
        try:
            r = _post_poison(s, base, item)
        except requests.RequestException:
            no_answer += 1
            time.sleep(0.3)
            continue
        if r.status_code == 503 and _is_problem(r) and _json(r).get("type") == PROBLEM_UNAVAILABLE:
            unavailable += 1
            time.sleep(0.5)
            continue
        task_id = _json(r).get("taskId") if r.status_code in (200, 202) else None
        return PoisonResult(
            item, r.status_code, _is_problem(r), task_id, r.text[:200], no_answer, unavailable
        )
    return PoisonResult(item, 0, False, None, "no answer within the run's bound", no_answer, unavailable)


def _replay_refusals(base: str, api_key: str, items: list[PoisonItem]) -> tuple[int, list[str]]:
    """Send each refused kind once more, once the faults are over: (sent, failures).

    Nothing else commits meanwhile, so no web process dies under the request:
    no answer at all, a 5xx or an answer other than the refusal is a failure.
    """
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {api_key}"
    failures: list[str] = []
    first = {item.kind: item for item in reversed(items) if item.expect >= 400}
    for item in first.values():
        try:
            r = _post_poison(s, base, item)
        except requests.RequestException as exc:
            failures.append(f"replay {item.kind}: no answer ({type(exc).__name__})")
            continue
        if r.status_code != item.expect or not _is_problem(r):
            failures.append(f"replay {item.kind}: {r.status_code} {r.text[:200]}")
    return len(first), failures


# -- Redis rolled back --------------------------------------------------------------


@dataclass
class Snapshot:
    path: Path  # the dump, moved out of Redis's directory
    dbfilename: str
    marker: str  # a key only the snapshot holds: its presence shows Redis loaded it
    taken: float  # time.monotonic()
    accepted: int  # tasks accepted when it was taken
    has_epoch: bool
    dispatch_ids: frozenset[str]  # the task ids it holds waiting or leased


def _redis(server: EmbeddedRedis) -> redis_client.Redis:
    return redis_client.Redis.from_url(server.url, socket_timeout=10, socket_connect_timeout=5)


def snapshot_redis(server: EmbeddedRedis, dest: Path, accepted: int) -> Snapshot:
    """SAVE the run's Redis and keep the dump aside (Redis's own directory must stay empty).

    Waits (up to 15 s) for the dispatch state's epoch: a snapshot without it
    would come back as an empty Redis, the fault the run already injects.
    """
    marker = f"chaos:snapshot:{dest.stem}"
    client = _redis(server)
    try:
        deadline = time.monotonic() + 15
        while not client.exists(EPOCH) and time.monotonic() < deadline:
            time.sleep(0.2)
        client.set(marker, "1")
        client.save()
        client.delete(marker)
        directory = Path(str(client.config_get("dir")["dir"]))
        dbfilename = str(client.config_get("dbfilename")["dbfilename"])
    finally:
        client.close()
    # An empty restart later in the run must find no dump to load.
    shutil.move(directory / dbfilename, dest)
    taken = time.monotonic()
    # What the snapshot holds, read from the dump itself in a Redis of its own:
    # the live one moves on at once, the snapshot does not.
    reader = EmbeddedRedis(dest.parent / f"{dest.stem}-reader", persist=False)
    reader.data_dir.mkdir(parents=True)
    shutil.copyfile(dest, reader.data_dir / dbfilename)
    reader.start()
    client = redis_client.Redis.from_url(reader.url, socket_timeout=10, decode_responses=True)
    try:
        has_epoch = bool(client.exists(EPOCH))
        ids = {str(m) for m in client.smembers(KNOWN)}
        ids |= {str(m) for m in client.zrange(LEASES, 0, -1)}
    finally:
        client.close()
        reader.stop()
        shutil.rmtree(reader.data_dir, ignore_errors=True)
    return Snapshot(dest, dbfilename, marker, taken, accepted, has_epoch, frozenset(ids))


def rollback_redis(server: EmbeddedRedis, snap: Snapshot, db: Database) -> tuple[bool, list[str]]:
    """Kill Redis and start it from the snapshot: (it came back as meant, confirmed tasks it lost).

    As meant: the restarted Redis holds the snapshot (its marker) and the
    snapshot the epoch. The second figure is what only the sweep's walk of
    every queued task can repair: tasks queued in SQL whose dispatch the
    sweep had already confirmed (``dispatched_at`` set) that the snapshot
    neither holds waiting nor leased. Counted against the snapshot, not the
    live Redis, which a sweep may already be repairing.
    """
    server.kill()
    dump = server.data_dir / snap.dbfilename
    shutil.copyfile(snap.path, dump)
    restarted = EmbeddedRedis(server.data_dir, port=server.port, persist=False).start()
    server.process = restarted.process
    dump.unlink()  # loaded (start() waits for PONG, which comes after loading)
    with db.read_session() as s:
        confirmed = s.execute(
            select(Task.id).where(Task.status == "queued", Task.dispatched_at.is_not(None))
        ).scalars()
        missing = [task_id for task_id in confirmed if task_id not in snap.dispatch_ids]
    client = _redis(server)
    try:
        loaded = bool(client.exists(snap.marker))
    finally:
        client.close()
    return loaded and snap.has_epoch, missing


def unrepaired(server: EmbeddedRedis, db: Database, task_ids: list[str]) -> list[str]:
    """Those of ``task_ids`` still queued in SQL that Redis neither holds waiting nor leased."""
    if not task_ids:
        return []
    with db.read_session() as s:
        queued = list(
            s.execute(select(Task.id).where(Task.id.in_(task_ids), Task.status == "queued")).scalars()
        )
    if not queued:
        return []
    client = _redis(server)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.smismember(KNOWN, queued)
        pipe.zmscore(LEASES, queued)
        waiting, leased = pipe.execute()
    finally:
        client.close()
    return [t for t, w, score in zip(queued, waiting, leased, strict=True) if not w and score is None]


# -- processes ----------------------------------------------------------------------


@dataclass
class Report:
    database: str = ""
    broker: str = "redis"
    tasks_accepted: int = 0
    worker_kills: int = 0
    child_kills: int = 0
    redis_restarts: int = 0
    redis_rollbacks: int = 0
    postgres_restarts: int = 0
    broker_disconnects: int = 0
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
    # Rollbacks: not as meant (the snapshot lacked the epoch, or Redis did not load it);
    # backlog tasks accepted; tasks accepted between snapshot and restore (all three
    # organizations); queued, confirmed tasks the restored Redis did not know; of those,
    # still queued and unknown to Redis 30 s later; the longest wait for the rest; tasks
    # the sweep's walk (verify_queued) put back, from its logs.
    rollback_invalid: int = 0
    rollback_backlog_accepted: int = 0
    rollback_tasks_after_snapshot: int = 0
    rollback_confirmed_missing: int = 0
    rollback_unrepaired: int = 0
    rollback_repair_seconds: float = 0.0
    sweep_restored: int = 0
    poison_submitted: int = 0
    poison_accepted: int = 0
    poison_refused: int = 0
    poison_5xx: int = 0
    poison_unexpected: int = 0  # an answer other than the kind's (a 5xx, no answer, not problem+json...)
    poison_retries: int = 0  # tries sent again: no answer, or 503 while PostgreSQL restarted
    poison_stored: int = 0  # tasks of the poison organization no accepted submission accounts for
    poison_charged: int = 0  # credit entries of that organization not for an accepted task
    poison_result_errors: int = 0  # an accepted one that ended wrong (fetch body, café webhook, echo)
    poison_replayed: int = 0
    poison_replay_failures: int = 0
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    timeline: list[str] = field(default_factory=list)  # when each fault happened (s from the start)
    poison_kinds: dict[str, dict[str, int]] = field(default_factory=dict)
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
            or self.rollback_invalid
            or self.rollback_unrepaired
            or self.poison_5xx
            or self.poison_unexpected
            or self.poison_stored
            or self.poison_charged
            or self.poison_result_errors
            or self.poison_replay_failures
        )

    def line(self) -> str:
        return (
            f"{self.tasks_accepted} tasks, {self.worker_kills + self.child_kills} worker kills, "
            f"{self.redis_restarts} Redis restarts, {self.redis_rollbacks} Redis rollbacks, "
            f"{self.postgres_restarts} PostgreSQL restarts, {self.broker_disconnects} broker disconnects, "
            f"{self.supervisor_restarts} supervisor restarts, {self.cancels} cancels, "
            f"{self.web_crashes} web crashes after commit: {self.lost + self.not_final} lost, "
            f"{self.duplicate_results} duplicate results, {self.double_charges} double charges, "
            f"{self.webhooks_accounted}/{self.webhooks_expected} webhooks accounted for; "
            f"{self.poison_submitted} poison submissions: {self.poison_refused} refused 4xx, "
            f"{self.poison_accepted} accepted, {self.poison_5xx} 5xx, {self.poison_unexpected} unexpected"
        )


def _client(
    base: str,
    api_keys: tuple[str, str],
    work: list[dict[str, Any] | PoisonItem],
    accepted: dict[str, str],
    poisoned: list[PoisonResult],
    stop_at: float,
) -> None:
    """Submits with idempotency keys and retries through faults, as a careful client would.

    Hostile items go out under the second organization's key, mixed in the same stream.
    """
    s, ps = requests.Session(), requests.Session()
    s.headers["Authorization"] = f"Bearer {api_keys[0]}"
    ps.headers["Authorization"] = f"Bearer {api_keys[1]}"
    for body in work:
        if isinstance(body, PoisonItem):
            poisoned.append(_send_poison(ps, base, body, stop_at))
            continue
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
    # TEST_AMQP_URL: Celery's broker is RabbitMQ (a virtual host of the run's
    # own); Redis, restarted and rolled back below, then holds dispatch only.
    amqp = os.environ.get(AMQP_URL_ENV)
    vhosts = contextlib.ExitStack()
    broker = {"BROKER_URL": vhosts.enter_context(vhost(amqp, "waybill-chaos"))} if amqp else {}
    env = {
        **os.environ,
        **broker,
        "DATABASE_URL": url,
        "REDIS_URL": redis.url,
        "VAR_DIR": str(root / "var"),
        **FAULT_ENV,
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
            "env": env,
            "broker": broker,
        }
    finally:
        for proc in procs.values():
            proc.stop()
        receiver.close()
        redis.stop()
        vhosts.close()
        if pg is not None:
            pg.remove()


def run_chaos(root: Path, cfg: ChaosConfig) -> Report:
    rng = random.Random(cfg.seed)
    started = time.monotonic()
    report = Report()
    with _platform(root, cfg) as p:
        report.database = "postgresql" if p["pg"] else "sqlite"
        report.broker = "rabbitmq" if p["broker"] else "redis"
        db = Database(p["url"])
        with db.session() as s:
            created = organizations.create_organization(
                s, "chaos", credits=cfg.tasks * 10, queue_limit=100_000, concurrency_limit=50
            )
            # The hostile submissions' own organization: every task and credit
            # entry it holds must come from a submission the API accepted.
            hostile = organizations.create_organization(
                s, "chaos-poison", credits=cfg.tasks * 10, queue_limit=100_000, concurrency_limit=10
            )
            org_id, api_key, secret = (
                created.organization.id,
                created.key.api_key,
                created.organization.webhook_secret,
            )
            poison_org_id, poison_key, poison_secret = (
                hostile.organization.id,
                hostile.key.api_key,
                hostile.organization.webhook_secret,
            )
            # One task at a time: what it is sent waits in Redis for seconds.
            slow = organizations.create_organization(
                s, "chaos-backlog", credits=cfg.tasks * 10, queue_limit=100_000, concurrency_limit=1
            )
            backlog_org_id, backlog_key, backlog_secret = (
                slow.organization.id,
                slow.key.api_key,
                slow.organization.webhook_secret,
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
        # Hostile submissions at random places of the same stream; a random
        # generator of their own, so the rest of the workload and the faults
        # are the same as without them.
        prng = random.Random(cfg.seed + 2)
        count = 0 if cfg.poison_share <= 0 else max(len(POISON_KINDS), round(cfg.tasks * cfg.poison_share))
        max_body = Settings.from_env(p["env"]).max_body_bytes
        poison = poison_items(count, p["receiver"].url, max_body, prng)
        work: list[dict[str, Any] | PoisonItem] = list(bodies)
        for item in poison:
            work.insert(prng.randrange(len(work) + 1), item)
        report.poison_submitted = len(poison)
        accepted: dict[str, str] = {}
        poisoned: list[PoisonResult] = []
        backlog: dict[str, str] = {}
        stop_at = started + cfg.max_seconds * 0.6
        chunks = [work[i :: cfg.clients] for i in range(cfg.clients)]
        clients = [
            threading.Thread(
                target=_client,
                args=(p["base"], (api_key, poison_key), chunk, accepted, poisoned, stop_at),
                daemon=True,
            )
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
            + (["broker"] * cfg.broker_disconnects if "BROKER_URL" in p["broker"] else [])
        )
        rng.shuffle(faults)
        # A rollback is a pair: a snapshot, then, once the workload has gone on
        # for some seconds (tasks submitted, released, confirmed by the sweep,
        # which runs every second with a 2 s grace) and another fault has
        # happened, Redis restarted from it. The first snapshot opens the
        # faults, while the clients submit the most; more go in the first third.
        # (Placed just after the PostgreSQL restart, it doubled the short run:
        # a webhook attempt claimed during the outage had its retry in Redis,
        # the rollback dropped it, and the claim holds it for 31.5 s.)
        rollback_rng = random.Random(cfg.seed + 3)
        for k in range(cfg.redis_rollbacks):
            at = 0 if k == 0 else rollback_rng.randint(0, len(faults) // 3)
            faults.insert(at, "snapshot")
            faults.insert(min(at + 2, len(faults)), "rollback")
        snapshots: list[Snapshot] = []

        def note(what: str) -> None:
            report.timeline.append(f"{time.monotonic() - started:.1f} s {what}")

        def all_accepted() -> int:
            return len(accepted) + len(backlog) + sum(1 for r in list(poisoned) if r.task_id)

        for n, fault in enumerate(faults):
            if fault == "snapshot":
                time.sleep(rollback_rng.uniform(0.3, 0.8))
                dump = root / f"redis-snapshot-{n}.rdb"
                snapshots.append(snapshot_redis(p["redis"], dump, all_accepted()))
                # The backlog: sent after the snapshot, so the snapshot has none
                # of it, by 4 senders, so it is all in before it drains.
                burst: list[dict[str, Any] | PoisonItem] = [
                    {"idempotencyKey": f"backlog-{n}-{i}", "type": "sleep", "input": {"seconds": 0.25}}
                    for i in range(cfg.rollback_backlog)
                ]
                for first in range(4):
                    sender = threading.Thread(
                        target=_client,
                        args=(p["base"], (backlog_key, backlog_key), burst[first::4], backlog, [], stop_at),
                        daemon=True,
                    )
                    sender.start()
                    clients.append(sender)
                note(f"Redis snapshot ({all_accepted()} tasks accepted)")
                continue
            if fault == "rollback":
                snap = snapshots.pop()  # the latest not rolled back to yet, when pairs overlap
                # A few sweeps (every second, 2 s grace) since the snapshot, and
                # the usual gap since the previous fault (an empty Redis must
                # live a while); then until a few backlog tasks wait with their
                # dispatch confirmed (at most 15 s more; sweeps stop while a
                # worker restarts): the case only the walk of every queued task
                # repairs.
                since_snapshot = snap.taken + rollback_rng.uniform(2.0, 3.0) - time.monotonic()
                time.sleep(max(rollback_rng.uniform(1.0, 3.0), since_snapshot))
                deadline = time.monotonic() + 15
                want = min(3, cfg.rollback_backlog)
                while time.monotonic() < deadline and _confirmed_waiting(db, backlog_org_id) < want:
                    time.sleep(0.2)
                as_meant, missing = rollback_redis(p["redis"], snap, db)
                restored_at = time.monotonic()
                report.redis_rollbacks += 1
                report.rollback_invalid += int(not as_meant)
                report.rollback_tasks_after_snapshot += all_accepted() - snap.accepted
                report.rollback_confirmed_missing += len(missing)
                note(
                    f"Redis rolled back to the snapshot ({all_accepted() - snap.accepted} tasks accepted "
                    f"since; {len(missing)} queued and confirmed tasks it lacks; as meant: {as_meant})"
                )
                # No other fault until the sweep's walk has put them back (or
                # they ran from a message a worker already held): an empty
                # restart right after would rebuild everything from SQL and
                # hide a walk that does not work.
                left = unrepaired(p["redis"], db, missing)
                while left and time.monotonic() < restored_at + 30:
                    time.sleep(0.25)
                    left = unrepaired(p["redis"], db, left)
                report.rollback_unrepaired += len(left)
                waited = time.monotonic() - restored_at
                report.rollback_repair_seconds = round(max(report.rollback_repair_seconds, waited), 1)
                if left:
                    report.problems.append(f"still lost 30 s after the rollback: {left[:5]}")
                note(f"{len(missing) - len(left)} of them back in dispatch or run")
                continue
            time.sleep(rng.uniform(1.0, 3.0))
            if fault == "worker":
                victim = procs[rng.choice(["worker", "webhooks"])]
                with fault_lock:
                    victim.kill()
                    time.sleep(0.5)
                    victim.start()
                report.worker_kills += 1
                note(f"{'task' if victim.name == 'worker' else victim.name} worker killed")
            elif fault == "child":
                if procs["worker"].kill_a_child():
                    report.child_kills += 1
                    note("pool child killed")
            elif fault == "redis":
                redis: EmbeddedRedis = p["redis"]
                redis.kill()
                time.sleep(1.0)
                restarted = EmbeddedRedis(redis.data_dir, port=redis.port, persist=False).start()
                redis.process = restarted.process
                report.redis_restarts += 1
                note("Redis restarted empty")
            elif fault == "broker":
                # RabbitMQ drops every connection of the run's virtual host:
                # unacknowledged messages go back to their queues, workers
                # and publishers reconnect.
                rabbitmqctl(
                    "close_all_connections", "-p", vhost_of(p["broker"]["BROKER_URL"]), "waybill chaos"
                )
                report.broker_disconnects += 1
                note("RabbitMQ closed every connection")
            elif fault == "postgres":
                p["pg"].stop("fast")
                time.sleep(2.0)
                p["pg"].start()
                report.postgres_restarts += 1
                note("PostgreSQL restarted")
        for t in clients:
            t.join(max(1.0, stop_at - time.monotonic() + 20))
        report.tasks_accepted = len(accepted)
        report.rollback_backlog_accepted = len(backlog)
        poison_ids = [r.task_id for r in poisoned if r.task_id]
        org_ids = [org_id, poison_org_id, backlog_org_id]

        # Drain: every task final and every delivery settled, or the deadline.
        drain_until = started + cfg.max_seconds
        while time.monotonic() < drain_until:
            with db.session() as s:
                open_tasks = s.execute(
                    select(func.count()).where(
                        Task.organization_id.in_(org_ids),
                        Task.status.in_(["queued", "running"]),
                    )
                ).scalar_one()
                pending = s.execute(
                    select(func.count()).where(WebhookDelivery.status == "pending")
                ).scalar_one()
            if open_tasks == 0 and pending == 0:
                break
            time.sleep(0.5)
        report.poison_replayed, failures = _replay_refusals(p["base"], poison_key, poison)
        report.poison_replay_failures = len(failures)
        report.problems.extend(failures)
        supervising.clear()
        supervisor.join(5)
        report.seconds = round(time.monotonic() - started, 1)
        report.web_crashes = (root / "web.log").read_text(errors="replace").count("exited with code 70")
        accepted_ids = [*accepted.values(), *poison_ids, *backlog.values()]
        check_books(report, db, org_ids, accepted_ids, p["receiver"])
        _check_poison(report, db, poison_org_id, poisoned, p["receiver"])
        logs = "".join(Path(proc.log_path).read_text(errors="replace") for proc in procs.values())
        # A result is recorded once per task: the workers' "task.finished" lines say so.
        finished: Counter[str] = Counter()
        for line in logs.splitlines():
            if not line.startswith("{"):
                continue
            if '"task.finished"' in line:
                with contextlib.suppress(ValueError):
                    finished[json.loads(line).get("task_id", "")] += 1
            elif '"dispatch.restored"' in line:
                # verify_queued's "restored=N checked=M"
                with contextlib.suppress(ValueError, IndexError):
                    status = str(json.loads(line).get("status", ""))
                    report.sweep_restored += int(status.split("restored=")[1].split()[0])
        report.duplicate_results += sum(n - 1 for n in finished.values() if n > 1)
        secrets = (secret, poison_secret, backlog_secret)
        keys = (api_key, poison_key, backlog_key)
        report.secrets_in_logs = sum(logs.count(value) for value in (*keys, *secrets))
        report.secrets_in_logs += sum(logs.count(value.removeprefix("whsec_")) for value in secrets)
        db.dispose()
    return report


def _confirmed_waiting(db: Database, org_id: str) -> int:
    """The organization's queued tasks whose dispatch the sweep has confirmed."""
    with db.read_session() as s:
        return int(
            s.execute(
                select(func.count()).where(
                    Task.organization_id == org_id,
                    Task.status == "queued",
                    Task.dispatched_at.is_not(None),
                )
            ).scalar_one()
        )


def check_books(
    report: Report,
    db: Database,
    org_ids: list[str],
    accepted_ids: list[str],
    receiver: Receiver,
) -> None:
    """The books of every organization of the run; ``statuses`` are the first one's (the workload's)."""
    with db.session() as s:
        rows = {t.id: t for t in s.execute(select(Task).where(Task.organization_id.in_(org_ids))).scalars()}
        report.statuses = dict(Counter(t.status for t in rows.values() if t.organization_id == org_ids[0]))
        report.lost = sum(1 for task_id in accepted_ids if task_id not in rows)
        report.not_final = sum(1 for t in rows.values() if t.status in ("queued", "running"))
        if report.lost:
            report.problems.append(f"accepted but missing: {[i for i in accepted_ids if i not in rows][:5]}")
        if report.not_final:
            report.problems.append(
                f"not final: {[t.id for t in rows.values() if t.status in ('queued', 'running')][:5]}"
            )
        by_key = Counter((t.organization_id, t.idempotency_key) for t in rows.values())
        report.duplicate_results += sum(
            n - 1 for n in by_key.values() if n > 1
        )  # one task per accepted request
        kinds: dict[str, Counter[str]] = defaultdict(Counter)
        for task_id, kind in s.execute(
            select(CreditEntry.task_id, CreditEntry.kind).where(CreditEntry.organization_id.in_(org_ids))
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
        for org_id in org_ids:
            org = s.get(Organization, org_id)
            ledger = s.execute(
                select(func.coalesce(func.sum(CreditEntry.amount), 0)).where(
                    CreditEntry.organization_id == org_id
                )
            ).scalar_one()
            assert org is not None
            report.ledger_mismatch += int(org.credits != ledger)
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


def _check_poison(
    report: Report, db: Database, org_id: str, results: list[PoisonResult], receiver: Receiver
) -> None:
    """Each hostile submission got its kind's answer; the refused ones left nothing behind.

    Lost, unfinished, double-charged accepted ones are :func:`check_books`'s
    (their organization is among its own); this checks what is particular
    to them. Call after ``report.web_crashes`` is known.
    """
    accepted = {r.task_id: r.item for r in results if r.task_id}
    with db.session() as s:
        rows = {t.id: t for t in s.execute(select(Task).where(Task.organization_id == org_id)).scalars()}
        stored = sorted(set(rows) - set(accepted))
        report.poison_stored = len(stored)
        if stored:
            report.problems.append(
                "poison tasks no accepted submission returned: "
                f"{[(rows[t].idempotency_key, rows[t].type) for t in stored[:5]]}"
            )
        charged = [
            (task_id, kind)
            for task_id, kind in s.execute(
                select(CreditEntry.task_id, CreditEntry.kind).where(CreditEntry.organization_id == org_id)
            )
            if kind != "grant" and task_id not in accepted
        ]
        report.poison_charged = len(charged)
        if charged:
            report.problems.append(f"poison credit entries for no accepted task: {charged[:5]}")
        deliveries = {d.task_id: d for d in s.execute(select(WebhookDelivery)).scalars() if d.task_id in rows}
        for r in results:
            kind, expect = r.item.kind, r.item.expect
            task = rows.get(r.task_id) if r.task_id else None
            outcome = str(r.status) if r.status else "no answer"
            if r.task_id:
                outcome += f" {task.status if task is not None else 'missing'}"
            counts = report.poison_kinds.setdefault(kind, {})
            counts[outcome] = counts.get(outcome, 0) + 1
            report.poison_retries += r.no_answer + r.unavailable
            if 200 <= r.status < 300:
                report.poison_accepted += 1
            elif 400 <= r.status < 500:
                report.poison_refused += 1
            elif r.status >= 500:
                report.poison_5xx += 1
            # 200: the replay of a submission whose 202 a web crash cut off.
            answered_as_expected = r.status == expect or (expect == 202 and r.status == 200)
            if not answered_as_expected or (r.status >= 400 and not r.problem_json):
                report.poison_unexpected += 1
                report.problems.append(f"poison {kind}: expected {expect}, got {outcome}: {r.detail}")
            if task is not None:
                error = _poison_result_error(r.item, task, deliveries.get(task.id), receiver)
                if error is not None:
                    report.poison_result_errors += 1
                    report.problems.append(f"poison {kind} {task.id}: {error}")
    # A refusal commits nothing, so no crash after commit can cut its own
    # answer off; only another request's crash in the same web process can.
    cut = sum(r.no_answer for r in results if 400 <= r.status < 500)
    if cut and not report.web_crashes:
        report.poison_unexpected += 1
        report.problems.append(f"{cut} tries of refused poison got no answer, and no web process crashed")


def _poison_result_error(
    item: PoisonItem, task: Task, delivery: WebhookDelivery | None, receiver: Receiver
) -> str | None:
    """What is wrong with how an accepted hostile submission ended, or None."""
    if item.kind == "fetch_nul_body":
        body = task.result.get("body", "") if isinstance(task.result, dict) else None
        if task.status != "succeeded" or not isinstance(body, str):
            return f"{task.status} ({task.error_code}), result {str(task.result)[:100]}"
        if "\x00" in body or body != NUL_BODY.decode().replace("\x00", "\ufffd"):
            return f"body {body[:100]!r}: U+0000 must come back as U+FFFD"
    elif item.kind == "webhook_cafe":
        if delivery is None or delivery.status != "delivered":
            return f"webhook {delivery.status if delivery else 'missing'}, not delivered"
        with receiver.lock:
            paths = {e["path"] for e in receiver.log if e["webhook_id"] == delivery.id}
        if CAFE_PATH_SENT not in paths:
            return f"the receiver saw it at {sorted(paths)}, not at {CAFE_PATH_SENT}"
    elif item.kind.startswith("control_") and (
        task.status != "succeeded" or task.result != json.loads(item.body)["input"]
    ):
        return f"{task.status} ({task.error_code}); an echo of an acceptable input must succeed"
    return None
