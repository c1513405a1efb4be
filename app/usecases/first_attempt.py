"""A task's first webhook attempt, sent by the worker process that finished the task.

The first attempt used to cross one more Celery hop (the ``tasks`` worker
published it, a ``webhooks`` worker picked it up) and one more transaction
(its claim): a publish, a broker round trip, a pool hand-over and a commit
between a result and its webhook, on the path every webhook consumer waits
on. Now the tasks worker reserves one of a small pool of threads of its own
process before it records the result; with a thread reserved, the same
transaction that records the result also claims the webhook's first attempt
(:func:`app.services.deliveries.claim_attempt`), and after the commit the
thread sends and records it (:func:`app.usecases.deliver.send_claimed`) while
the worker goes on with its next task. Retries stay on the ``webhooks``
queue, and so does the first attempt when every thread is busy: a slow
receiver never holds a task slot, nor piles up threads.

Nothing is lost if the process dies meanwhile: the delivery is a
``pending`` row due now, claimed for the attempt's deadline plus 30 s; once
that claim expires the sweep publishes it, as for any lost message.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("waybill.worker")


class FirstAttempts:
    def __init__(self, send: Callable[[Any], object], threads: int) -> None:
        self._send = send
        self._threads = threads
        self._lock = threading.Lock()
        self._busy = 0
        self._pid = 0
        self._pool: ThreadPoolExecutor | None = None

    def reserve(self) -> bool:
        """Hold a thread for an attempt to come (True), or say no: every thread busy, or none."""
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
            return True

    def start(self, plan: Any) -> None:
        """Send a claimed attempt on the thread :meth:`reserve` held."""
        if self._pool is not None:
            try:
                self._pool.submit(self._run, plan)
                return
            except RuntimeError:  # the pool is shutting down with the process
                pass
        self.release()
        log.warning(
            "first webhook attempt left to the sweep",
            extra={"event": "webhook.first_attempt_failed", "webhook_id": plan.delivery_id},
        )

    def release(self) -> None:
        """Give back a thread that :meth:`reserve` held and that has nothing to send."""
        with self._lock:
            self._busy -= 1

    def _run(self, plan: Any) -> None:
        try:
            self._send(plan)
        except Exception:
            # send_claimed records every failure of the exchange itself; what
            # reaches here is a database that is away: the delivery stays
            # pending, and the sweep publishes it once its claim expires.
            log.warning(
                "first webhook attempt left to the sweep",
                exc_info=True,
                extra={"event": "webhook.first_attempt_failed", "webhook_id": plan.delivery_id},
            )
        finally:
            self.release()

    @property
    def busy(self) -> int:
        return self._busy
