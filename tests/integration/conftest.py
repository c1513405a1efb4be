"""Real processes for integration tests: Redis, Celery workers, beat, gunicorn, HTTP receivers.

Every process runs in its own process group, logs to a file under the test's
temporary directory (printed when a test fails), and is stopped at the end of
the test, killed if it does not stop in time.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from app.db import Database
from app.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import Org, empty_tables, make_org
from tests.processes import Process as Proc

pytestmark = pytest.mark.integration


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def shared_redis_url() -> Iterator[str]:
    """``REDIS_URL`` when CI gives one (a database index of our own), else an embedded server."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(
        Path(os.environ.get("TMPDIR", "/tmp")) / f"waybill-test-redis-{os.getpid()}", persist=False
    )
    server.start()
    yield server.url
    server.stop()


@dataclass
class Stack:
    """Builds and owns the processes of one test."""

    env: dict[str, str]
    log_dir: Path
    db: Database
    procs: list[Proc] = field(default_factory=list)
    base_url: str = ""

    def start(self, name: str, argv: list[str], **env: str) -> Proc:
        proc = Proc(name, argv, {**self.env, **env}, self.log_dir)
        self.procs.append(proc)
        return proc

    def worker(
        self, name: str = "worker", queues: str = "tasks,maintenance", concurrency: int = 2, **env: str
    ) -> Proc:
        proc = self.start(
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
                "--pool",
                "prefork",
                "--hostname",
                f"{name}-{len(self.procs)}@%h",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            **env,
        )
        wait_for(lambda: "ready." in proc.output() or not proc.alive(), 60, f"{name} to be ready")
        assert proc.alive(), proc.output()
        return proc

    def webhooks_worker(self, **env: str) -> Proc:
        return self.worker("webhooks", queues="webhooks,maintenance", concurrency=4, **env)

    def beat(self) -> Proc:
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
                str(self.log_dir / "celerybeat-schedule"),
                "--loglevel",
                "INFO",
            ],
        )

    def web(self) -> Proc:
        port = free_port()
        proc = self.start(
            "web",
            [
                sys.executable,
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
        )
        self.base_url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return requests.get(self.base_url + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return not proc.alive()

        wait_for(up, 60, "gunicorn to answer")
        assert proc.alive(), proc.output()
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def make_stack(
    request: pytest.FixtureRequest, tmp_path: Path, migrated: str, shared_redis_url: str
) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []
    db = Database(migrated)

    def build(redis_url: str | None = None, **env: str) -> Stack:
        url = redis_url or shared_redis_url
        redis.Redis.from_url(url).flushdb()
        empty_tables(db)
        full_env = {
            **os.environ,
            "DATABASE_URL": migrated,
            "REDIS_URL": url,
            "VAR_DIR": str(tmp_path / "var"),
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "FETCH_ALLOW_PRIVATE": "true",
            "SWEEP_INTERVAL_SECONDS": "1",
            "SWEEP_GRACE_SECONDS": "2",
            "TASK_LEASE_SECONDS": "3",
            "WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            "WEBHOOK_TIMEOUT_SECONDS": "2",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        stack = Stack(env=full_env, log_dir=tmp_path, db=db)
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        stack.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for stack in stacks:
            for proc in stack.procs:
                sys.stderr.write(f"\n----- {proc.name} log -----\n{proc.output()[-6000:]}\n")
    empty_tables(db)
    db.dispose()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]


class Api:
    def __init__(self, base_url: str, org: Org) -> None:
        self.base_url = base_url
        self.org = org
        self.http = requests.Session()
        self.http.headers.update(org.headers)

    def submit(self, body: dict[str, Any], **headers: str) -> requests.Response:
        return self.http.post(self.base_url + "/v1/tasks", json=body, headers=headers, timeout=30)

    def get(self, task_id: str) -> dict[str, Any]:
        r = self.http.get(f"{self.base_url}/v1/tasks/{task_id}", timeout=30)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_status(self, task_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
        return dict(
            wait_for(
                lambda: (t := self.get(task_id))["status"] in statuses and t,
                timeout,
                f"task {task_id} to reach {statuses}",
                interval=0.1,
            )
        )


@pytest.fixture
def new_org() -> Callable[..., Org]:
    def build(stack: Stack, name: str = "acme", **kwargs: Any) -> Org:
        return make_org(stack.db, name, **kwargs)

    return build


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """A real HTTP webhook receiver on 127.0.0.1; ``respond`` decides each answer."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.respond: Callable[[int], tuple[int, dict[str, str], bytes, float]] = lambda n: (
            200,
            {},
            b"ok",
            0,
        )
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.received.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
                    )
                    n = len(receiver.received)
                status, headers, payload, delay = receiver.respond(n)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, which it may stop and restart (never the shared one)."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    yield server
    server.stop()
