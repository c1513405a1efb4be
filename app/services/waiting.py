"""``Prefer: wait=N``: hold a response until a task is final, woken by Redis pub/sub.

A worker that records a final status publishes on the task's channel
(:data:`app.dispatch.keys.DONE_CHANNEL`, through ``Dispatch.finish`` or ``notify``);
a waiting request subscribes before it reads the task (so no wake-up can slip
between the read and the wait), then sleeps on the subscription, not on the
database. Each web process lets at most ``limit`` requests wait at once; the
rest answer at once as if no wait was asked, so waiting can never take every
thread of a process.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable

import redis

from app.dispatch import keys

MAX_WAIT_SECONDS = 60
CHANNEL = keys.DONE_CHANNEL
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6})\"?", re.IGNORECASE)


def parse_prefer_wait(header: str | None) -> int | None:
    """Seconds asked for by ``Prefer: wait=N`` (capped at 60), or None."""
    if not header:
        return None
    match = _PREFER_WAIT.search(header)
    if match is None:
        return None
    return min(int(match.group(1)), MAX_WAIT_SECONDS)


class Waiter:
    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(max(0, limit)) if limit > 0 else None

    def wait(
        self, client: redis.Redis, task_id: str, seconds: float, is_final: Callable[[], bool]
    ) -> bool | None:
        """Wait until ``is_final()`` or ``seconds`` pass; None when no waiting slot was free."""
        if self._slots is None or not self._slots.acquire(blocking=False):
            return None
        try:
            return self._wait(client, task_id, seconds, is_final)
        finally:
            self._slots.release()

    @staticmethod
    def _wait(client: redis.Redis, task_id: str, seconds: float, is_final: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + seconds
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(CHANNEL + task_id)
        except redis.RedisError:
            pubsub = None
        try:
            while True:
                if is_final():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if pubsub is None:
                    time.sleep(min(left, 0.5))  # Redis is away: poll the database slowly
                    continue
                try:
                    # Woken by the worker's message; re-check at least every 5 s in
                    # case a message was lost.
                    pubsub.get_message(timeout=min(left, 5.0))
                except redis.RedisError:
                    pubsub = None
        finally:
            if pubsub is not None:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()
