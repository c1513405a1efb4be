"""The tasks worker's events go out in batches (app/worker_consumer.py)."""

from __future__ import annotations

from typing import Any

from app.celery_app import celery_config
from app.worker_consumer import EVENTS_FLUSH_SECONDS, BatchedEventsConsumer
from config import Settings


class FakeHub:
    def __init__(self) -> None:
        self.later: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any) -> object:
        self.later.append((delay, callback))
        return object()


class FakeDispatcher:
    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def consumer() -> tuple[BatchedEventsConsumer, FakeHub, FakeDispatcher]:
    c = object.__new__(BatchedEventsConsumer)  # the loop's parts only, no broker connection
    hub, dispatcher = FakeHub(), FakeDispatcher()
    c.hub, c.event_dispatcher = hub, dispatcher
    return c, hub, dispatcher


def test_events_buffered_within_the_window_go_in_one_flush() -> None:
    c, hub, dispatcher = consumer()
    for _ in range(3):  # received, started, succeeded of one task
        c.on_send_event_buffered()
    assert [delay for delay, _ in hub.later] == [EVENTS_FLUSH_SECONDS]
    assert dispatcher.flushes == 0
    hub.later[0][1]()
    assert dispatcher.flushes == 1
    c.on_send_event_buffered()  # the next event opens the next window
    assert len(hub.later) == 2


def test_the_buffer_is_flushed_before_the_consumer_shuts_down(monkeypatch: Any) -> None:
    c, _hub, dispatcher = consumer()
    shut: list[bool] = []
    monkeypatch.setattr("celery.worker.consumer.Consumer.shutdown", lambda self: shut.append(True))
    c.on_send_event_buffered()
    c.shutdown()
    assert dispatcher.flushes == 1 and shut == [True]


def test_waybill_workers_use_it() -> None:
    assert celery_config(Settings(redis_url="redis://127.0.0.1:1/0"))["worker_consumer"] == (
        "app.worker_consumer:BatchedEventsConsumer"
    )
