"""The processes of a run on 127.0.0.1: Celery workers, beat, gunicorn, and any other command.

Integration tests (``tests/integration/conftest.py``'s ``make_stack``) and the
benchmarks (``bench/harness.py``'s ``Platform``) build their processes here.
Every process runs in its own process group, from the repository's root (so
``-A workers.main`` and ``app.wsgi`` are this checkout's), logs to
``log_dir/NAME.log``, and is stopped by :meth:`Stack.stop`: SIGTERM to all,
then a kill for whatever has not exited in time.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

import requests

from app.db import Database
from app.embedded_redis import free_port
from tests.support.orgs import Org, make_org
from tests.support.processes import Process
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


@dataclass(kw_only=True)
class Stack:
    env: dict[str, str]
    log_dir: Path
    db: Database
    # Celery's --loglevel. At INFO a worker says "ready.", which ``worker`` waits for.
    loglevel: str = "INFO"
    # Whether ``worker`` returns only once the worker consumes. The benchmarks
    # do not wait: their clock starts when the process does.
    wait_ready: bool = True
    # Keyword defaults of ``org`` (``make_org``'s own when empty).
    org_defaults: dict[str, int] = field(default_factory=dict)
    procs: list[Process] = field(default_factory=list)
    base_url: str = ""

    def __post_init__(self) -> None:
        # The web process, like a deployment's, serves the operator console and
        # so needs its credentials (`waybill serve` refuses to start without
        # them): a fresh pair per stack unless the caller's environment has one.
        if not self.env.get("CONSOLE_BASIC_AUTH"):
            self.env = {**self.env, "CONSOLE_BASIC_AUTH": f"operator:{secrets.token_urlsafe(16)}"}

    @property
    def console_auth(self) -> tuple[str, str]:
        """The console's (user, password), for ``requests``' ``auth=``."""
        user, _, password = self.env["CONSOLE_BASIC_AUTH"].partition(":")
        return user, password

    def start(self, name: str, argv: list[str], **env: str) -> Process:
        proc = Process(name, argv, {**self.env, **env}, self.log_dir, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def worker(
        self,
        name: str = "worker",
        queues: str = "tasks,maintenance",
        concurrency: int = 2,
        *,
        app: str = "workers.main",
        **env: str,
    ) -> Process:
        proc = self.start(
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
                "--pool",
                "prefork",
                "--hostname",
                f"{name}-{len(self.procs)}@%h",
                "--loglevel",
                self.loglevel,
                "--without-gossip",
                "--without-mingle",
            ],
            **env,
        )
        if self.wait_ready:
            wait_for(lambda: "ready." in proc.output() or not proc.alive(), 60, f"{name} to be ready")
            self._check_alive(proc)
        return proc

    def webhooks_worker(self, **env: str) -> Process:
        return self.worker("webhooks", queues="webhooks,maintenance", concurrency=4, **env)

    def beat(self) -> Process:
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
                self.loglevel,
            ],
        )

    def web(self, workers: int = 2, threads: int = 8) -> Process:
        """gunicorn serving ``app.wsgi:app`` on a free port; returns once /healthz answers."""
        proc, self.base_url = self.gunicorn("web", "app.wsgi:app", workers, threads)
        return proc

    def gunicorn(self, name: str, app: str, workers: int, threads: int) -> tuple[Process, str]:
        """gunicorn serving the WSGI ``app`` on a free port, once /healthz answers: (process, base URL)."""
        port = free_port()
        argv = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}"]
        proc = self.start(name, [*argv, "--workers", str(workers), "--threads", str(threads), app])
        url = f"http://127.0.0.1:{port}"
        self.wait_healthy(proc, url, name)
        return proc, url

    def serve(self, workers: int = 2, threads: int = 16) -> Process:
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
        self.wait_healthy(proc, self.base_url, "waybill serve")
        return proc

    def wait_healthy(self, proc: Process, base_url: str, what: str, timeout: float = 60) -> None:
        """Until ``base_url``/healthz answers 200; a process that exits meanwhile fails at once."""

        def up() -> bool:
            try:
                return requests.get(base_url + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return not proc.alive()

        wait_for(up, timeout, f"{what} to answer")
        self._check_alive(proc)

    def org(self, name: str = "acme", **kwargs: int) -> Org:
        return make_org(self.db, name, **{**self.org_defaults, **kwargs})

    def stop_one(self, proc: Process, timeout: float = 30) -> None:
        """Stop one process (warm: Celery finishes what it holds), killed if it does not stop in time."""
        proc.stop(timeout)
        self.procs.remove(proc)

    def stop(self) -> None:
        # Every process is told at once, then each gets its time: a stack's
        # shutdown takes as long as its slowest process, not their sum.
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            proc.finish(15)

    @staticmethod
    def _check_alive(proc: Process) -> None:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.output()[-6000:]}")
