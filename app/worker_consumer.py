"""The Celery worker's consumer, with its task events sent in batches rather than one by one.

Celery's worker buffers task events (received, started, succeeded...) and
asks its event loop to flush them "soon", which under load means at nearly
every turn of the loop: one synchronous broker publish (a Redis ``PUBLISH``
round trip) per turn, two or three per task. Profiled under
``bench/versus.py``'s submit -> finished load, these flushes were 38% of a
``tasks`` worker's main process (``docs/performance.rst``), the process that
hands messages to the pool and acknowledges them, so every task waited on them.

This consumer flushes at most every :data:`EVENTS_FLUSH_SECONDS` instead: the
first buffered event schedules one flush, and the events that follow within
that window ride with it in one ``task-multi`` message (Celery's own grouped
format, which Flower reads). Each event keeps the timestamp of the moment it
happened; Flower merely shows it up to that long later. Celery still flushes
at once when its buffer holds 24 events, and the events left in the buffer are
flushed before the consumer shuts down.

Selected by the ``worker_consumer`` setting (``app.celery_app.celery_config``).
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer

EVENTS_FLUSH_SECONDS = 0.1


class BatchedEventsConsumer(Consumer):
    _events_flush_due: Any = None

    def on_send_event_buffered(self) -> None:
        if self.hub is None or self._events_flush_due is not None:
            return
        self._events_flush_due = self.hub.call_later(EVENTS_FLUSH_SECONDS, self._flush_events_due)

    def _flush_events_due(self) -> None:
        self._events_flush_due = None
        self._flush_events()

    def shutdown(self) -> None:
        # The buffered events would otherwise go with the dispatcher's connection.
        self._events_flush_due = None
        self._flush_events()
        super().shutdown()
