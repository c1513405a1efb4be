"""A task's first webhook attempt, sent by the worker process that finished the task.

The first attempt used to cross one more Celery hop (the ``tasks`` worker
published it, a ``webhooks`` worker picked it up): a publish, a broker round
trip and a pool hand-over between a result and its webhook, on the path
every webhook consumer waits on. Now the tasks worker hands it to a small
pool of threads of its own process right after the result is committed and
goes on with its next task; the thread runs the same use case as the
``webhooks`` queue (:func:`app.usecases.deliver.deliver`: claim, send with no
transaction open, record). Retries stay on the ``webhooks`` queue, and so
does the first attempt whenever every thread is busy (a slow receiver never
holds a task slot, nor piles up threads).

Nothing is lost if the process dies meanwhile: the delivery is a
``pending`` row due now, so the sweep publishes it once its claim (if it was
claimed) has expired, as for any attempt whose message was lost.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("waybill.worker")


class FirstAttempts:
    def __init__(self, send: Callable[[str], object], threads: int) -> None:
        self._send = send
        self._threads = threads
        self._lock = threading.Lock()
        self._busy = 0
        self._pid = 0
        self._pool: ThreadPoolExecutor | None = None

    def offer(self, delivery_id: str) -> bool:
        """Send it from here (True), or say no (False: every thread busy, or none configured)."""
        if self._threads <= 0:
            return False
        with self._lock:
            # Per process: a Celery prefork child does not inherit its parent's threads.
            if self._pid != os.getpid() or self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="first-attempt")
                self._pid, self._busy = os.getpid(), 0
            if self._busy >= self._threads:
                return False
            self._busy += 1
            pool = self._pool
        try:
            pool.submit(self._run, delivery_id)
        except RuntimeError:  # the pool is shutting down with the process
            self._done()
            return False
        return True

    def _run(self, delivery_id: str) -> None:
        try:
            self._send(delivery_id)
        except Exception:
            # deliver() records every failure of the exchange itself; what
            # reaches here is a database that is away: the delivery stays
            # pending and due, and the sweep publishes it.
            log.warning(
                "first webhook attempt left to the sweep",
                exc_info=True,
                extra={"event": "webhook.first_attempt_failed", "webhook_id": delivery_id},
            )
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._busy -= 1

    @property
    def busy(self) -> int:
        return self._busy
