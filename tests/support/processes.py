"""A child process of a test or a benchmark: its own process group, its output in a log file."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil


class Process:
    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None
    ) -> None:
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes]
        self.start()

    def start(self) -> None:
        """(Re)start the command; a new process group, so a kill reaches its children too."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines of the output, in order (Waybill's and Celery's: app/logs.py)."""
        records = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records

    def alive(self) -> bool:
        return self.process.poll() is None

    def exited(self) -> bool:
        return not self.alive()

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group (a worker's main process and its pool) and reap it."""
        self.kill_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def kill_a_child(self) -> bool:
        children = psutil.Process(self.process.pid).children(recursive=True)
        if not children:
            return False
        random.choice(children).kill()
        return True

    def terminate(self) -> None:
        """SIGTERM the group: Celery and gunicorn shut down warm (they finish what they hold)."""
        if self.alive():
            self.kill_group(signal.SIGTERM)

    def finish(self, timeout: float = 15) -> None:
        """Wait up to ``timeout`` seconds for a terminated process, then kill what is left of its group."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.kill()

    def stop(self, timeout: float = 15) -> None:
        self.terminate()
        self.finish(timeout)
