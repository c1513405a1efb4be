"""The lease-renewal thread (app/services/leases.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from app.services import lifecycle
from app.services.leases import Leases


class RecordingDispatch:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, str | None]] = []
        self.changed = threading.Condition()

    def renew(self, task_id: str, lease_seconds: float, notify: str | None = None) -> None:
        with self.changed:
            self.calls.append((task_id, lease_seconds, notify))
            self.changed.notify_all()


class NoDatabase:
    @contextmanager
    def session(self) -> Iterator[object]:
        yield object()


def test_the_first_renewal_announces_the_start_and_later_ones_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    renewed_in_sql: list[str] = []

    def renew_lease(_session: object, task_id: str, _attempt: int, _until: object) -> bool:
        renewed_in_sql.append(task_id)
        return True

    monkeypatch.setattr(lifecycle, "renew_lease", renew_lease)
    dispatch = RecordingDispatch()
    leases = Leases()
    with leases.hold(NoDatabase(), dispatch, "t1", 1, 0.3), dispatch.changed:  # type: ignore[arg-type]
        assert dispatch.changed.wait_for(lambda: len(dispatch.calls) >= 3, timeout=5)
    assert dispatch.calls[0] == ("t1", 0.3, "running")  # switched to the run's lease, and announced
    assert all(notify is None for _, _, notify in dispatch.calls[1:])
    assert renewed_in_sql and set(renewed_in_sql) == {"t1"}  # the later ones renew SQL's lease too
    count = len(dispatch.calls)
    time.sleep(0.3)
    assert len(dispatch.calls) == count  # a run that ended is renewed no more


def test_a_run_that_ends_before_the_thread_gets_to_it_announces_nothing() -> None:
    dispatch = RecordingDispatch()
    leases: Any = Leases()
    wake = leases._wake
    with leases._lock:
        leases._ensure_thread()
    time.sleep(0.2)  # the thread waits for a run to be held
    leases._wake = threading.Event()  # ... and hears nothing of this one until it has ended
    with leases.hold(NoDatabase(), dispatch, "t2", 1, 60):
        pass
    wake.set()
    time.sleep(0.2)
    assert dispatch.calls == []
