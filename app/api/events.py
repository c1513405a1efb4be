"""``GET /v1/tasks/{taskId}/events``: a task's events as Server-Sent Events.

History first (derived from the stored task, :mod:`app.services.task_events`),
then live: the stream subscribes to the task's Redis channel *before* it
reads the task, so nothing committed between the read and the wait is
missed, and re-reads the task whenever a worker publishes there (started,
progress stored, final status; ``Prefer: wait`` listens on the same channel).
A stream on any web process thus sees what any worker committed. Without
Redis it re-reads the task every second. Comment lines keep an idle stream
alive every ``KEEPALIVE_SECONDS``; the stream ends after the final event.

Each open stream holds one thread of its web process (gunicorn's gthread
worker) and one Redis connection. ``waybill serve`` gives every web process
``WEB_THREADS`` threads for ordinary requests plus ``EVENT_STREAMS_PER_PROCESS``
for streams, and a semaphore keeps streams to their share: past the bound a
stream answers 503 with ``Retry-After``, so streams can never starve
submissions and polls (docs/performance.rst has the measurement and why
threads rather than an async worker class).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Response, request

from app.api.plumbing import organization_id, read_session, waybill
from app.container import Waybill
from app.dispatch import keys
from app.services import queries
from app.services.errors import NotFound, ServiceError
from app.services.task_events import TaskEvent, events_of, parse_last_event_id

bp = Blueprint("task_events", __name__, url_prefix="/v1/tasks")

# docs/api.md: "Comment lines keep an idle stream alive (at least every 15 s)".
KEEPALIVE_SECONDS = 15.0
# Without Redis, how often the task is read again.
POLL_SECONDS = 1.0
RETRY_AFTER_SECONDS = 5


class TooManyStreams(ServiceError):
    status = 503
    type_slug = "too-many-event-streams"
    title = "Too many open event streams"

    def __init__(self, bound: int) -> None:
        super().__init__(
            f"This server process already serves {bound} event streams; retry after "
            f"{RETRY_AFTER_SECONDS} s, or poll GET /v1/tasks/{{taskId}}."
        )
        self.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)


class StreamSlots:
    """At most ``bound`` streams at once in this process (a bound of 0 turns streams off)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._slots = threading.BoundedSemaphore(bound) if bound > 0 else None
        self._lock = threading.Lock()
        self.open = 0

    def take(self) -> None:
        if self._slots is None or not self._slots.acquire(blocking=False):
            raise TooManyStreams(self.bound)
        with self._lock:
            self.open += 1

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1
        assert self._slots is not None
        self._slots.release()


_slots: dict[int, StreamSlots] = {}  # per app container (tests build several apps in one process)
_slots_lock = threading.Lock()


def slots_of(wb: Waybill) -> StreamSlots:
    with _slots_lock:
        found = _slots.get(id(wb))
        if found is None:
            found = _slots[id(wb)] = StreamSlots(wb.settings.event_streams_per_process)
        return found


def _frame(event: TaskEvent) -> bytes:
    data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.id}\nevent: {event.event}\ndata: {data}\n\n".encode()


@bp.get("/<task_id>/events")
def task_events(task_id: str) -> Response:
    org_id = organization_id()
    with read_session() as s:
        queries.get_task(s, org_id, task_id)  # 404 before any stream opens
    wb = waybill()
    slots = slots_of(wb)
    slots.take()
    try:
        pubsub = _subscribe(wb, task_id)
    except BaseException:
        slots.give_back()
        raise
    last_id = parse_last_event_id(request.headers.get("Last-Event-ID"))
    response = Response(
        _stream(wb, org_id, task_id, last_id, pubsub, slots),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    return response


def _subscribe(wb: Waybill, task_id: str) -> Any:
    try:
        pubsub = wb.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.DONE_CHANNEL + task_id)
        return pubsub
    except (redis.RedisError, RuntimeError):
        return None  # Redis away: the stream polls the database instead


def _stream(
    wb: Waybill, org_id: str, task_id: str, last_id: int, pubsub: Any, slots: StreamSlots
) -> Iterator[bytes]:
    try:
        # Tells EventSource how long to wait before reconnecting after a drop.
        yield b"retry: 2000\n\n"
        quiet_since = time.monotonic()
        while True:
            try:
                with wb.db.read_session() as s:
                    events = events_of(queries.get_task(s, org_id, task_id))
            except NotFound:
                return  # deleted by retention while the stream was open
            for event in events:
                if event.id > last_id:
                    yield _frame(event)
                    last_id = event.id
                    quiet_since = time.monotonic()
            if events[-1].final:
                return
            if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()
            wait = max(0.0, KEEPALIVE_SECONDS - (time.monotonic() - quiet_since))
            pubsub = _wait(pubsub, wait)
    finally:
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                pubsub.close()
        slots.give_back()


def _wait(pubsub: Any, seconds: float) -> Any:
    """Until the task's channel says something or ``seconds`` pass; the pubsub to use next."""
    if pubsub is None:
        time.sleep(min(seconds, POLL_SECONDS))
        return None
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return pubsub
            # In slices shorter than the client's socket timeout (5 s).
            message = pubsub.get_message(timeout=min(left, 4.0))
            if message is not None:
                # Drain what else arrived meanwhile: one read of the task answers all of it.
                while message is not None:
                    message = pubsub.get_message(timeout=0)
                return pubsub
    except redis.RedisError:
        with contextlib.suppress(redis.RedisError):
            pubsub.close()
        return None
