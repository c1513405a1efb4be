"""Delivery isolation through real workers: a hanging receiver, and a host that refuses connections.

``-s`` prints the latency figures that docs/performance.rst quotes
("Webhook isolation (issue 17)").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest

from app import redis_conn
from app.embedded_redis import free_port
from app.services.circuits import snapshot
from tests.support import Api, Receiver, Stack, wait_for

pytestmark = pytest.mark.integration

GOOD_TASKS = 20
BAD_BACKLOG = 40


def _latencies(api: Api, receiver: Receiver, count: int) -> list[float]:
    """Submit -> webhook received, one task at a time (seconds)."""
    out: list[float] = []
    for i in range(count):
        started = time.perf_counter()
        r = api.submit({"type": "echo", "input": {"i": i}, "webhook": {"url": receiver.url + "/good"}})
        assert r.status_code == 202, r.text
        arrived = receiver.wait_for_task(r.json()["taskId"], timeout=30)
        assert arrived is not None, f"webhook of good task {i} not received within 30 s"
        out.append(arrived - started)
    return out


def _figures(name: str, values: list[float]) -> str:
    return f"{name}: p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"


def test_a_hanging_receiver_of_one_organization_does_not_hold_back_anothers_webhooks(
    make_stack: Callable[..., Stack],
) -> None:
    # The slots alone: no circuit (a receiver that hangs would open it, and
    # its deliveries would stop taking workers for that reason instead).
    stack = make_stack(WEBHOOK_CIRCUIT_FAILURES="0")
    stack.web()
    stack.worker()
    stack.webhooks_worker()
    stack.beat()
    # Answers after the stack's whole WEBHOOK_TIMEOUT_SECONDS (2 s): every attempt times out.
    with Receiver(lambda n: (200, {}, b"late", 2.5)) as bad, Receiver() as good:
        good_api = Api(stack.base_url, stack.org("good"))
        bad_api = Api(stack.base_url, stack.org("bad"))
        _latencies(good_api, good, 2)  # warm-up: connections, first imports
        alone = _latencies(good_api, good, GOOD_TASKS)

        for i in range(BAD_BACKLOG):
            r = bad_api.submit({"type": "echo", "input": {"i": i}, "webhook": {"url": bad.url + "/bad"}})
            assert r.status_code == 202, r.text
        wait_for(lambda: len(bad.received) >= 2, 30, "the bad receiver to be hanging")
        loaded = _latencies(good_api, good, GOOD_TASKS)
        bad_in_flight = len(bad.received)

    print(
        f"\nwebhook isolation: {_figures('alone', alone)}; with {BAD_BACKLOG} deliveries to a "
        f"receiver hanging 2 s: {_figures('beside it', loaded)} "
        f"({bad_in_flight} of the hanging receiver's requests had arrived meanwhile)"
    )
    # Without isolation the good webhooks queue behind the backlog: ~40 x 2 s
    # over the 4 webhooks slots (and the first-attempt threads) = 10 - 20 s.
    assert max(loaded) < 4.0, loaded
    # The bad organization still gets its turn: it is bounded, not stopped.
    assert bad_in_flight >= 2


def _deliveries(api: Api, task_id: str) -> list[dict]:
    r = api.http.get(f"{api.base_url}/v1/tasks/{task_id}/deliveries", timeout=10)
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def test_a_host_that_refuses_connections_opens_its_circuit_until_it_comes_back(
    make_stack: Callable[..., Stack],
) -> None:
    port = free_port()  # nothing listens there: connections are refused
    url = f"http://127.0.0.1:{port}/hook"
    host = f"127.0.0.1:{port}"
    stack = make_stack(
        WEBHOOK_CIRCUIT_FAILURES="3",
        WEBHOOK_CIRCUIT_COOLDOWN_SECONDS="2",
        WEBHOOK_CIRCUIT_MAX_SECONDS="4",
    )
    redis = redis_conn.connect(stack.env["REDIS_URL"])
    stack.web()
    senders = [stack.worker(), stack.webhooks_worker()]  # first attempts, and the rest
    stack.beat()
    api = Api(stack.base_url, stack.org())

    def deferred() -> int:
        return sum(
            r.get("event") == "webhook.deferred" and r.get("status") == "circuit_open"
            for proc in senders
            for r in proc.log_records()
        )

    first = [api.submit({"type": "echo", "webhook": {"url": url}}).json()["taskId"] for _ in range(3)]
    wait_for(
        lambda: any(c["host"] == host for c in snapshot(redis)), 30, "the circuit to open after 3 refusals"
    )
    [circuit] = [c for c in snapshot(redis) if c["host"] == host]
    assert circuit["consecutive_failures"] >= 3

    later = [api.submit({"type": "echo", "webhook": {"url": url}}).json()["taskId"] for _ in range(5)]
    wait_for(lambda: deferred() >= 5, 30, "deliveries to the host to be deferred")
    time.sleep(3)  # a probe or two fails meanwhile (cool-down 2 s, then 4 s)
    later_attempts = [len(_deliveries(api, t)[0]["attempts"]) for t in later]
    first_attempts = [len(_deliveries(api, t)[0]["attempts"]) for t in first]
    # Deferred, not attempted: only probes count, one at a time, every 2 - 4 s.
    assert sum(later_attempts) <= 2, later_attempts
    assert sum(first_attempts) <= 3 + 2, first_attempts  # their retries wait for the circuit too
    assert all(_deliveries(api, t)[0]["status"] == "pending" for t in first + later)

    def settled(task_id: str) -> dict | None:
        d = _deliveries(api, task_id)[0]
        return d if d["status"] != "pending" else None

    with Receiver(port=port) as back:
        for task_id in first + later:
            delivery = dict(
                wait_for(
                    lambda: settled(task_id),  # noqa: B023 - called before the loop moves on
                    30,
                    f"the delivery of {task_id} after the host came back",
                    interval=0.2,
                )
            )
            assert delivery["status"] == "delivered", delivery
            assert len(delivery["attempts"]) <= 5
        assert not any(c["host"] == host for c in snapshot(redis))  # the probe closed it
        assert {r.headers["webhook-id"] for r in back.received} >= {
            _deliveries(api, t)[0]["webhookId"] for t in later
        }
