"""The Celery workers that answer a ping, asked at most every few seconds and never waited on for long.

A ping is a broadcast on the broker and waits for replies; with the broker
down, kombu may retry its connection for longer than a page may take. So the
ping runs on one background thread, its answer is kept
:data:`CACHE_SECONDS` (a console refreshed by several operators sends one
broadcast, not one per page view), and once an answer is old a page shows
it while a new ping runs. Only a process's first overview waits, and at most
:data:`WAIT_SECONDS`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

PING_TIMEOUT_SECONDS = 1.0
WAIT_SECONDS = 2.0
CACHE_SECONDS = 10.0

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-ping")
_lock = threading.Lock()
_pending: Future[list[str]] | None = None
_latest: tuple[float, WorkersSeen] | None = None  # (monotonic time, answer)


@dataclass(frozen=True)
class WorkersSeen:
    names: list[str]
    answered: bool  # False: no answer (the broker refused, or none yet)
    error: str | None = None


def _ping(celery: Any) -> list[str]:
    replies = celery.control.inspect(timeout=PING_TIMEOUT_SECONDS).ping() or {}
    return sorted(replies)


def _answer(future: Future[list[str]]) -> WorkersSeen:
    try:
        return WorkersSeen(future.result(), answered=True)
    except Exception as exc:  # the broker refused: shown on the page, never raised into it
        return WorkersSeen([], answered=False, error=type(exc).__name__)


def _finished(future: Future[list[str]]) -> None:
    global _pending, _latest
    answer = _answer(future)
    with _lock:
        if _pending is future:  # not a ping that forget() dropped
            _latest = (time.monotonic(), answer)
            _pending = None


def seen(celery: Any) -> WorkersSeen:
    """The workers that answered the latest ping, or why there is no answer."""
    global _pending
    with _lock:
        latest = _latest
        if latest is not None and time.monotonic() - latest[0] < CACHE_SECONDS:
            return latest[1]
        pending = _pending
        started = pending is None
        if pending is None:
            pending = _pending = _executor.submit(_ping, celery)
    if started:
        # Outside the lock: a ping already over runs its callback right here.
        pending.add_done_callback(_finished)
    if latest is not None:
        return latest[1]  # a new ping is under way; the next page view shows it
    try:
        # Only the view that asked waits; others, meanwhile, answer at once.
        pending.result(timeout=WAIT_SECONDS if started else 0)
    except FutureTimeout:
        return WorkersSeen([], answered=False, error="no answer yet")
    except Exception:
        pass  # _answer says which
    return _answer(pending)


def forget() -> None:
    """Drop the latest answer and any ping under way (tests)."""
    global _latest, _pending
    with _lock:
        _latest = None
        _pending = None
