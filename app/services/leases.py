"""Renewing the leases of the runs in progress in this process, from one thread.

A run's dispatch lease in Redis goes at once from the release lease (how
long a released task may wait for a worker) to the run's own; then both
leases, SQL's and Redis's, are renewed every third of their length. One
long-lived thread per process does it, so a run costs no thread start and
no Redis round trip on its own path; a run that ends before the thread
gets to it (most short tasks) needs nothing renewed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from app.db import Database
from app.models import TaskStatus
from app.models.base import utcnow
from app.services import lifecycle

log = logging.getLogger("waybill.runner")


class Renews(Protocol):
    """What renewing needs of dispatch (:class:`app.dispatch.Dispatch`)."""

    def renew(self, task_id: str, lease_seconds: float, notify: str | None = None) -> None: ...


@dataclass
class _Run:
    db: Database
    dispatch: Renews | None
    task_id: str
    attempt: int
    lease: float
    due: float  # monotonic time of its next renewal
    switched: bool = False  # its dispatch lease moved from the release lease to the run's


class Leases:
    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0

    def _ensure_thread(self) -> None:
        # Per process: a Celery prefork child does not inherit its parent's threads.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            threading.Thread(target=self._loop, name="lease-renewal", daemon=True).start()

    @contextmanager
    def hold(
        self, db: Database, dispatch: Renews | None, task_id: str, attempt: int, lease: float
    ) -> Iterator[None]:
        run = _Run(db, dispatch, task_id, attempt, lease, due=time.monotonic())
        with self._lock:
            self._ensure_thread()
            self._runs[task_id] = run
        self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                if self._runs.get(task_id) is run:
                    del self._runs[task_id]

    def _loop(self) -> None:
        while True:
            with self._lock:
                runs = list(self._runs.values())
            now = time.monotonic()
            for run in runs:
                if run.due <= now:
                    self._renew(run)
            with self._lock:
                dues = [r.due for r in self._runs.values()]
            self._wake.wait(timeout=max(0.0, min(dues) - time.monotonic()) if dues else None)
            self._wake.clear()

    def _renew(self, run: _Run) -> None:
        with self._lock:
            if self._runs.get(run.task_id) is not run:
                return  # finished meanwhile
        run.due = time.monotonic() + run.lease / 3
        try:
            if run.switched:
                with run.db.session() as session:
                    until = utcnow() + timedelta(seconds=run.lease)
                    if not lifecycle.renew_lease(session, run.task_id, run.attempt, until):
                        with self._lock:  # canceled or taken over: nothing left to renew
                            self._runs.pop(run.task_id, None)
                        return
            first, run.switched = not run.switched, True  # the claim set the SQL lease; only Redis's switches
            if run.dispatch is not None:
                # The first renewal also tells the task's event streams that it
                # runs: no round trip of its own on the run's path, and none at
                # all for a run that ends before this thread gets to it (the
                # final status wakes the streams, which read "started" from the
                # stored task). A Prefer: wait request woken by it reads the task
                # and goes on waiting.
                run.dispatch.renew(run.task_id, run.lease, TaskStatus.RUNNING.value if first else None)
        except Exception:  # a database blip: try again at the next beat
            log.warning("lease renewal failed", extra={"task_id": run.task_id})


leases = Leases()
