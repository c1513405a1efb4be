"""FirstAttempts: a bounded pool of threads that sends first attempts, saying no when full."""

from __future__ import annotations

import threading

from app.usecases.first_attempt import FirstAttempts


def test_offers_beyond_the_threads_are_declined_and_a_failure_frees_its_thread() -> None:
    release = threading.Event()
    sent: list[str] = []

    def send(delivery_id: str) -> None:
        sent.append(delivery_id)
        release.wait(5)
        if delivery_id == "boom":
            raise RuntimeError("database away")

    attempts = FirstAttempts(send, threads=2)
    assert attempts.offer("boom") and attempts.offer("b")
    assert not attempts.offer("c")  # both threads busy: the caller publishes it instead
    release.set()
    for _ in range(100):
        if attempts.busy == 0:
            break
        threading.Event().wait(0.05)
    assert attempts.busy == 0 and sorted(sent) == ["b", "boom"]
    assert attempts.offer("d")  # a raising send gave its thread back


def test_no_threads_means_every_attempt_goes_through_the_queue() -> None:
    assert not FirstAttempts(lambda _d: None, threads=0).offer("a")
