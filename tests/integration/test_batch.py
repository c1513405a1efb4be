"""``POST /v1/tasks/batch`` through gunicorn, real Celery workers, beat, Redis and SQL.

Batches of 300 from parallel clients, racing each other and single
submissions for credits, queue places and idempotency keys: every item gets
the answer it would have got alone, every accepted task runs to
``succeeded``, and credits, ledger and counters agree at the end.
"""

from __future__ import annotations

import inspect
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from app import redis_conn
from app.dispatch import keys as dispatch_keys
from app.embedded_redis import free_port
from app.models import CreditEntry, Task
from tests.support import Org, Stack, wait_for
from tests.support.orgs import ledger_sum, organization
from tests.support.redis_topologies import ClusterSetup
from tests.unit import test_batch as on_fakeredis

pytestmark = pytest.mark.integration

THREADS = 3
BATCH = 300
SHARED_KEYS = 40  # the same request in every batch and in single submissions: one task each
CONFLICT_KEYS = 20  # a different request in each batch: one task each, the others 422


def _batch_items(n: int) -> list[dict[str, Any]]:
    """Batch ``n``: shared keys, conflicting keys, keys used twice in it, invalid items, plain items."""
    items: list[dict[str, Any]] = []
    for i in range(BATCH):
        if i % 10 == 9:
            items.append({"type": "sleep", "input": {"seconds": 301}})  # 400
        elif i < SHARED_KEYS * 2 and i % 2 == 0:
            items.append({"type": "echo", "input": "shared", "idempotencyKey": f"shared-{i // 2}"})
        elif i < SHARED_KEYS * 2:
            items.append(
                {
                    "type": "echo",
                    "input": {"batch": n},
                    "idempotencyKey": f"conflict-{i // 2 % CONFLICT_KEYS}",
                }
            )
        elif i < 120 and i % 2 == 0:
            items.append({"type": "echo", "input": i, "idempotencyKey": f"twice-{n}-{i}"})
        elif i < 120:
            items.append({"type": "echo", "input": i - 1, "idempotencyKey": f"twice-{n}-{i - 1}"})  # replay
        else:
            items.append({"type": "echo", "input": {"batch": n, "i": i}})
    return items


def _post(stack: Stack, org: Org, body: Any, path: str = "/v1/tasks/batch") -> requests.Response:
    return requests.post(stack.base_url + path, json=body, headers=org.headers, timeout=120)


def _in_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def test_batches_race_each_other_and_single_submissions_and_every_accepted_task_runs(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.web(workers=2, threads=8)
    stack.worker(concurrency=4)
    stack.beat()
    credits_org = stack.org("credits", credits=500)  # ~640 tasks asked for: runs out mid-batch
    queue_org = stack.org("queue", queue_limit=30, concurrency_limit=1)  # fills mid-batch

    shared = [
        {"type": "echo", "input": "shared", "idempotencyKey": f"shared-{k}"} for k in range(SHARED_KEYS)
    ]

    def batch(n: int) -> Callable[[], Any]:
        def call() -> Any:
            a = _post(stack, credits_org, {"tasks": _batch_items(n)})
            b = _post(stack, queue_org, {"tasks": [{"type": "echo", "input": [n, i]} for i in range(BATCH)]})
            assert a.status_code == b.status_code == 200, (a.text[:500], b.text[:500])
            return a.json()["data"], b.json()["data"]

        return call

    def singles() -> Any:
        return [_post(stack, credits_org, body, "/v1/tasks") for body in shared]

    results = _in_threads([batch(n) for n in range(THREADS)] + [singles])
    by_batch = [results[n] for n in range(THREADS)]
    single_answers = results[THREADS]

    # -- credits: exactly 500 tasks, each answer the one the item gets alone ----------------
    with stack.db.read_session() as s:
        tasks = {
            t.id: t for t in s.execute(select(Task).where(Task.organization_id == credits_org.id)).scalars()
        }
    created = [e["task"]["taskId"] for a, _ in by_batch for e in a if e["status"] == 202]
    created += [r.json()["taskId"] for r in single_answers if r.status_code == 202]
    assert len(created) == len(set(created)) == len(tasks) == 500
    assert set(created) == set(tasks)
    for n, (a, _) in enumerate(by_batch):
        items = _batch_items(n)
        seen_402 = False
        for item, entry in zip(items, a, strict=True):
            status = entry["status"]
            if item["type"] == "sleep":
                assert status == 400 and "input.seconds" in entry["problem"]["errors"]
                continue
            assert status in (200, 202, 402, 422), entry
            key = item.get("idempotencyKey")
            if status in (200, 202):
                task = tasks[entry["task"]["taskId"]]
                assert (task.idempotency_key, task.input) == (key, item["input"])
            if status == 200:
                assert key is not None
            if status == 422:
                assert key is not None and key.startswith("conflict-")
                assert entry["problem"]["idempotencyKey"] == key
            if status == 402:
                seen_402 = True
                assert (entry["problem"]["balance"], entry["problem"]["cost"]) == (0, 1)
            elif seen_402 and key is None:
                raise AssertionError(
                    f"batch {n}: an unkeyed item accepted after the credits ran out: {entry}"
                )
    keys = Counter(t.idempotency_key for t in tasks.values() if t.idempotency_key)
    assert max(keys.values()) == 1
    assert any(e["status"] == 402 for a, _ in by_batch for e in a)

    # -- the queue limit: in item order, the queue never drains within a batch ---------------
    queue_answers = [b for _, b in by_batch]
    for b in queue_answers:
        statuses = [e["status"] for e in b]
        assert set(statuses) <= {202, 429}
        first_full = statuses.index(429)  # 300 items, limit 30: it fills in every batch
        assert set(statuses[first_full:]) == {429}
        for e in b[first_full:]:
            assert (e["problem"]["queued"], e["problem"]["queueLimit"]) == (30, 30)
    queue_created = [e["task"]["taskId"] for b in queue_answers for e in b if e["status"] == 202]
    assert 30 <= len(queue_created) < 3 * BATCH

    # -- every accepted task runs to succeeded; credits, ledger and counters agree -----------
    everything = len(tasks) + len(queue_created)

    def all_succeeded() -> bool:
        with stack.db.read_session() as s:
            done = s.execute(select(func.count()).where(Task.status == "succeeded")).scalar_one()
        return bool(done == everything)

    wait_for(all_succeeded, 120, f"{everything} tasks to succeed")
    with stack.db.read_session() as s:
        assert s.execute(select(func.count()).select_from(Task)).scalar_one() == everything
        reserves = s.execute(
            select(CreditEntry.organization_id, func.count())
            .where(CreditEntry.kind == "reserve")
            .group_by(CreditEntry.organization_id)
        ).all()
    assert dict(reserves) == {credits_org.id: 500, queue_org.id: len(queue_created)}
    for org, balance in ((credits_org, 0), (queue_org, 1000 - len(queue_created))):
        row = organization(stack.db, org.id)
        assert (row.credits, row.queued, row.running) == (balance, 0, 0)
        assert ledger_sum(stack.db, org.id) == balance


def test_a_batch_accepted_while_redis_is_away_runs_once_the_sweep_finds_it(
    make_stack: Callable[..., Stack], shared_redis_url: str
) -> None:
    """Dispatch is best effort after the commit: beat's sweep enqueues what the batch could not.

    The web process alone cannot reach Redis; the worker and beat can, and the
    dispatch state is whole (its epoch is set), so the tasks are found as any
    unconfirmed queued task is, from SQL, not by a rebuild.
    """
    stack = make_stack()
    worker = stack.worker()
    stack.beat()
    client = redis_conn.connect(shared_redis_url)
    wait_for(lambda: client.exists(dispatch_keys.EPOCH), 30, "the first sweep to mark the dispatch state")
    reachable = stack.env
    stack.env = {**reachable, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    stack.web()
    stack.env = reachable
    org = stack.org()
    r = _post(stack, org, {"tasks": [{"type": "echo", "input": i} for i in range(50)]})
    assert r.status_code == 200 and {e["status"] for e in r.json()["data"]} == {202}
    ids = [e["task"]["taskId"] for e in r.json()["data"]]
    assert "enqueue failed" in stack.procs[-1].output()

    def all_succeeded() -> bool:
        with stack.db.read_session() as s:
            done = s.execute(select(func.count()).where(Task.id.in_(ids), Task.status == "succeeded"))
            return bool(done.scalar_one() == len(ids))

    wait_for(all_succeeded, 60, "the batch's tasks to succeed")
    events = Counter(record.get("event") for record in worker.log_records())
    assert events["dispatch.rebuilt"] == 1  # the first sweep's only: the batch was found, not rebuilt
    republished = [r["status"] for r in worker.log_records() if r.get("event") == "sweep.republished"]
    assert sum(int(s.split()[0].removeprefix("tasks=")) for s in republished) == len(ids), republished


# -- dispatch on a Redis Cluster ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario",
    [
        on_fakeredis.test_enqueue_many_and_step_is_each_enqueue_in_order_then_one_step,
        on_fakeredis.test_enqueue_many_publishes_what_the_step_released_and_survives_redis_away,
    ],
    ids=lambda f: f.__name__.removeprefix("test_"),
)
def test_enqueue_many_on_the_cluster(
    scenario: Callable[..., None], cluster: ClusterSetup, request: pytest.FixtureRequest
) -> None:
    """The unit scenarios on redis-py's cluster client, whose pipeline refuses ``evalsha``."""
    cluster.flushall()
    for node in cluster.nodes:
        node.client().script_flush()
    client = redis_conn.connect(cluster.url, socket_connect_timeout=2, socket_timeout=5)
    try:
        names = inspect.signature(scenario).parameters
        scenario(**{n: client if n == "r" else request.getfixturevalue(n) for n in names})
    finally:
        client.close()
