"""``POST /v1/tasks/batch``: each item judged as ``POST /v1/tasks`` would judge it alone, in order.

Through Flask's test client on fakeredis and the test database (SQLite, or
PostgreSQL with ``DATABASE_URL``). The real processes are in
``tests/integration/test_batch.py``.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from werkzeug.test import TestResponse

from app import create_app
from app.db import Database
from app.dispatch import Dispatch, Dispatcher, DispatchSettings, keys
from app.models import CreditEntry, Task
from app.models.base import utcnow
from app.services import submission
from app.services.task_types import Registry, TaskType
from app.usecases import sweep
from config import Settings
from tests.conftest import RecordingPublisher
from tests.support import Org, make_org
from tests.support.orgs import ledger_sum
from tests.support.orgs import organization as org_row
from tests.unit.test_api import assert_problem

HOOK = "https://93.184.215.14/hook"  # a literal public address: no DNS at submission


def post_batch(client: FlaskClient, org: Org, items: list[Any], **headers: str) -> TestResponse:
    return client.post("/v1/tasks/batch", json={"tasks": items}, headers={**org.headers, **headers})


def entries(client: FlaskClient, org: Org, items: list[Any], **headers: str) -> list[dict[str, Any]]:
    r = post_batch(client, org, items, **headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == "application/json"
    data: list[dict[str, Any]] = r.get_json()["data"]
    assert len(data) == len(items)
    return data


def statuses(data: list[dict[str, Any]]) -> list[int]:
    return [e["status"] for e in data]


def stored(db: Database, org: Org) -> list[Task]:
    with db.read_session() as s:
        return list(s.execute(select(Task).where(Task.organization_id == org.id).order_by(Task.id)).scalars())


def consistent(db: Database, org: Org) -> tuple[int, int]:
    """(credits, queued), once the balance is checked against the ledger and queued against the tasks."""
    row = org_row(db, org.id)
    assert row.credits == ledger_sum(db, org.id)
    assert row.queued == sum(1 for t in stored(db, org) if t.status == "queued")
    with db.read_session() as s:
        reserves = s.execute(
            select(func.count()).where(CreditEntry.organization_id == org.id, CreditEntry.kind == "reserve")
        ).scalar_one()
    assert reserves == sum(1 for t in stored(db, org) if t.cost)  # one reservation per task, none dangling
    return row.credits, row.queued


# -- accepted -----------------------------------------------------------------------------


def test_a_batch_is_accepted_in_item_order_committed_and_dispatched(
    client: FlaskClient, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    items = [{"type": "echo", "input": {"n": i}, "metadata": {"i": i}} for i in range(30)]
    items.append({"type": "sleep", "input": {"seconds": 1}, "webhook": {"url": HOOK}})
    data = entries(client, org, items)
    assert statuses(data) == [202] * 31
    tasks = [e["task"] for e in data]
    assert [t["input"] for t in tasks[:30]] == [{"n": i} for i in range(30)]
    assert tasks[30]["webhook"] == {
        "url": HOOK,
        "status": "none",
        "attempts": 0,
        "events": ["task.succeeded", "task.failed", "task.canceled"],
    }
    assert all(t["status"] == "queued" and t["cost"] == 1 for t in tasks)
    ids = [t["taskId"] for t in tasks]
    assert ids == sorted(ids) and len(set(ids)) == 31  # in item order, newest last
    # Each is the task as GET shows it, committed.
    for task in (tasks[0], tasks[30]):
        assert client.get(f"/v1/tasks/{task['taskId']}", headers=org.headers).get_json() == task
    assert consistent(db, org) == (1000 - 31, 31)
    # Handed to dispatch: as many released as the target, the rest waiting in item order.
    target = DispatchSettings().queue_target
    assert publisher.tasks == ids[:target]
    waiting = client.application.extensions["waybill"].dispatcher.redis.lrange(
        keys.waiting_key(org.id), 0, -1
    )
    assert [w.decode() for w in waiting] == ids[target:]
    # Newest first in the list: the batch's last item first.
    listed = client.get("/v1/tasks?limit=2", headers=org.headers).get_json()["data"]
    assert [t["taskId"] for t in listed] == [ids[30], ids[29]]


def test_prefer_wait_does_not_apply(client: FlaskClient, org: Org) -> None:
    r = post_batch(client, org, [{"type": "echo"}], Prefer="wait=5")
    assert r.status_code == 200 and "Preference-Applied" not in r.headers
    assert statuses(r.get_json()["data"]) == [202]


# -- the whole batch refused ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "tasks"),
        ({"tasks": []}, "tasks"),
        ({"tasks": [{"type": "echo"}] * 1001}, "tasks"),
        ({"tasks": {"type": "echo"}}, "tasks"),
        ({"tasks": None}, "tasks"),
        ({"tasks": [{"type": "echo"}], "extra": 1}, "extra"),
        ([{"type": "echo"}], "body"),
        ({"type": "echo"}, "type"),
    ],
)
def test_a_body_that_is_not_tasks_of_1_to_1000_is_400(
    client: FlaskClient, db: Database, org: Org, publisher: RecordingPublisher, body: Any, field: str
) -> None:
    problem = assert_problem(client.post("/v1/tasks/batch", json=body, headers=org.headers), 400)
    assert field in problem["errors"], problem
    assert stored(db, org) == [] and publisher.tasks == []


def test_1000_items_are_one_batch(client: FlaskClient, db: Database, org: Org) -> None:
    data = entries(client, org, [{"type": "echo", "input": i} for i in range(1000)])
    assert statuses(data) == [202] * 1000
    assert consistent(db, org) == (0, 1000)


@pytest.mark.parametrize("raw", [b"{", b'{"tasks": [NaN]}', b"\xff", b'{"tasks": [' + b"[" * 100_000])
def test_a_body_that_is_not_json_is_400(client: FlaskClient, org: Org, raw: bytes) -> None:
    r = client.post("/v1/tasks/batch", data=raw, headers={**org.headers, "Content-Type": "application/json"})
    assert_problem(r, 400)


def test_not_json_is_415_and_too_large_is_413(client: FlaskClient, db: Database, org: Org) -> None:
    r = client.post("/v1/tasks/batch", data="tasks=1", headers={**org.headers, "Content-Type": "text/plain"})
    assert_problem(r, 415)
    big = json.dumps({"tasks": [{"type": "echo", "input": "x" * 100_000}] * 11})
    r = client.post("/v1/tasks/batch", data=big, headers={**org.headers, "Content-Type": "application/json"})
    assert_problem(r, 413)
    assert stored(db, org) == []


def test_the_idempotency_key_header_is_refused(client: FlaskClient, db: Database, org: Org) -> None:
    problem = assert_problem(post_batch(client, org, [{"type": "echo"}], **{"Idempotency-Key": "k"}), 400)
    assert list(problem["errors"]) == ["Idempotency-Key"]
    assert stored(db, org) == []


def test_a_batch_needs_a_key(client: FlaskClient) -> None:
    assert_problem(client.post("/v1/tasks/batch", json={"tasks": [{"type": "echo"}]}), 401)


# -- each item judged alone -------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


INVALID: list[Any] = [
    {},
    {"type": "nope"},
    {"type": "sleep", "input": {"seconds": 301}},
    {"type": "sleep"},
    {"type": "echo", "webhook": {"url": "http://127.0.0.1:9/hook"}},  # loopback: refused here
    {"type": "echo", "webhook": {"url": "file:///etc/passwd"}},
    {"type": "echo", "idempotencyKey": ""},
    {"type": "echo", "metadata": {"k": "v" * 5000}},
    {"type": "echo", "surprise": 1},
    {"type": "echo", "input": {"name": "a\u0000b"}},  # U+0000: this item's 400, not the batch's
    {"type": "echo", "input": ["ok", {"k\u0000": 1}]},
    {"type": "echo", "input": nested(33)},  # 33 levels in the item, not counting the batch's
    {"type": "echo", "metadata": nested(33)},
]


def test_each_invalid_item_gets_the_problem_a_single_submission_gets(
    client: FlaskClient, db: Database, org: Org
) -> None:
    items = [x for bad in INVALID for x in (bad, {"type": "echo", "input": nested(32)})]
    data = entries(client, org, [*items, 7, None, "echo", [{"type": "echo"}]])
    assert statuses(data) == [400, 202] * len(INVALID) + [400] * 4
    for item, entry in zip(items[::2], data[::2], strict=False):
        alone = client.post("/v1/tasks", json=item, headers=org.headers)
        assert_problem(alone, 400)
        # The same problem, its fields named as in that body.
        assert entry["problem"] == alone.get_json(), item
    for entry in data[-4:]:
        assert entry["problem"]["errors"] == {"body": ["Must be a JSON object."]}
    assert len(stored(db, org)) == len(INVALID)  # the valid ones, 32 levels deep
    assert consistent(db, org) == (1000 - len(INVALID), len(INVALID))


def test_one_dns_look_up_per_webhook_url_and_batch(
    client: FlaskClient, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.services import outbound

    checked: list[str] = []
    real = outbound.check_url

    def check_url(url: str, **kw: Any) -> Any:
        checked.append(url)
        return real(url, **kw)

    monkeypatch.setattr(outbound, "check_url", check_url)
    bad = "http://10.0.0.1/hook"
    items = [{"type": "echo", "webhook": {"url": u}} for u in (HOOK, bad, HOOK, bad)]
    assert statuses(entries(client, org, items)) == [202, 400, 202, 400]
    assert checked == [HOOK, bad]


# -- credits and the queue limit, in item order -----------------------------------------------


def test_credits_run_out_mid_batch_and_each_item_sees_the_balance_left(
    client: FlaskClient, db: Database
) -> None:
    org = make_org(db, "poor", credits=5)
    fetch = {"type": "http.fetch", "input": {"url": "https://example.com/"}}  # cost 2
    echo = {"type": "echo"}  # cost 1
    data = entries(client, org, [fetch, fetch, fetch, echo, echo, fetch, echo])
    assert statuses(data) == [202, 202, 402, 202, 402, 402, 402]
    problems = [e["problem"] for e in data if e["status"] == 402]
    assert [(p["balance"], p["cost"]) for p in problems] == [(1, 2), (0, 1), (0, 2), (0, 1)]
    assert all(p["type"] == "urn:waybill:problem:insufficient-credits" for p in problems)
    assert problems[0]["detail"] == "This task costs 2 credits and the organization's balance is 1."
    assert consistent(db, org) == (0, 3)
    assert [t.type for t in stored(db, org)] == ["http.fetch", "http.fetch", "echo"]


def test_the_queue_fills_mid_batch(client: FlaskClient, db: Database) -> None:
    org = make_org(db, "small", queue_limit=3)
    assert client.post("/v1/tasks", json={"type": "echo"}, headers=org.headers).status_code == 202
    data = entries(client, org, [{"type": "echo", "input": i} for i in range(4)])
    assert statuses(data) == [202, 202, 429, 429]
    full = data[2]["problem"]
    assert full["type"] == "urn:waybill:problem:queue-full"
    assert (full["queued"], full["queueLimit"]) == (3, 3)
    assert re.search(r"Retry after \d+ seconds\.$", full["detail"]), full
    assert consistent(db, org) == (997, 3)


def test_a_queue_full_item_says_when_to_retry_from_the_drain_rate(client: FlaskClient, db: Database) -> None:
    org = make_org(db, "small", queue_limit=1)
    dispatcher = client.application.extensions["waybill"].dispatcher
    dispatcher.redis.hset(keys.DRAIN, org.id, f"0.26:{int(utcnow().timestamp() * 1000)}")
    data = entries(client, org, [{"type": "echo"}, {"type": "echo"}])
    assert statuses(data) == [202, 429]
    assert "Retry after 4 seconds" in data[1]["problem"]["detail"]


def test_an_item_that_does_not_fit_does_not_stop_a_cheaper_one_after_it(
    db: Database, settings: Settings, publisher: RecordingPublisher, fake_redis: fakeredis.FakeRedis
) -> None:
    def free(task_input: Any, _context: Any) -> Any:
        return task_input

    registry = Registry(
        [
            TaskType(name="dear", cost=5, description="Costs five.", handler=free),
            TaskType(name="cheap", cost=1, description="Costs one.", handler=free),
            TaskType(name="free", cost=0, description="Costs nothing.", handler=free),
        ]
    )
    app = create_app(settings, db=db, registry=registry, publisher=publisher, redis_client=fake_redis)
    client = app.test_client()
    org = make_org(db, "mixed", credits=6, queue_limit=5)
    items = [{"type": t} for t in ("dear", "dear", "cheap", "free", "cheap", "free", "free", "free")]
    # Credits are checked first, as for a single submission: the second cheap one is 402.
    assert statuses(entries(client, org, items)) == [202, 402, 202, 202, 402, 202, 202, 429]
    assert consistent(db, org) == (0, 5)
    with db.read_session() as s:  # a free task reserves nothing
        kinds = Counter(
            s.execute(select(CreditEntry.kind).where(CreditEntry.organization_id == org.id)).scalars()
        )
    assert kinds == {"grant": 1, "reserve": 2}


# -- idempotency keys -----------------------------------------------------------------------------


def test_keys_of_stored_tasks_replay_or_conflict(
    client: FlaskClient, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    first = client.post(
        "/v1/tasks", json={"type": "echo", "input": 1, "idempotencyKey": "k1"}, headers=org.headers
    )
    assert first.status_code == 202
    data = entries(
        client,
        org,
        [
            {"type": "echo", "input": 1, "idempotencyKey": "k1"},
            {"type": "echo", "input": 2, "idempotencyKey": "k1"},
            {"type": "echo", "input": 3, "idempotencyKey": "k2"},
        ],
    )
    assert statuses(data) == [200, 422, 202]
    assert data[0]["task"] == first.get_json()  # the stored task as it is now
    alone = client.post(
        "/v1/tasks", json={"type": "echo", "input": 2, "idempotencyKey": "k1"}, headers=org.headers
    )
    assert data[1]["problem"] == assert_problem(alone, 422)
    assert consistent(db, org) == (998, 2)
    assert len(publisher.tasks) == 2  # the replay queued nothing


def test_a_key_used_twice_in_one_batch_replays_the_first_or_conflicts(
    client: FlaskClient, db: Database, org: Org
) -> None:
    same = {"type": "echo", "input": {"a": 1, "b": 2}, "idempotencyKey": "dup"}
    data = entries(
        client,
        org,
        [
            same,
            {"type": "echo", "input": {"b": 2, "a": 1}, "idempotencyKey": "dup"},  # the same JSON value
            {"type": "echo", "input": {"a": 1}, "idempotencyKey": "dup"},
            same,
        ],
    )
    assert statuses(data) == [202, 200, 422, 200]
    assert data[1]["task"] == data[3]["task"] == data[0]["task"]
    assert data[2]["problem"]["idempotencyKey"] == "dup"
    assert consistent(db, org) == (999, 1)
    # And a later single submission replays it.
    again = client.post("/v1/tasks", json=same, headers=org.headers)
    assert again.status_code == 200 and again.get_json()["taskId"] == data[0]["task"]["taskId"]


def test_a_key_whose_first_item_was_refused_is_free_for_a_later_one(
    client: FlaskClient, db: Database
) -> None:
    org = make_org(db, "poor", credits=1)
    dear = {"type": "http.fetch", "input": {"url": "https://example.com/"}, "idempotencyKey": "k"}
    cheap = {"type": "echo", "idempotencyKey": "k"}
    data = entries(client, org, [dear, cheap, dear, cheap])
    # Alone, in turn: refused (no key taken), accepted, a different request (422), a replay.
    assert statuses(data) == [402, 202, 422, 200]
    assert data[3]["task"]["taskId"] == data[1]["task"]["taskId"]
    assert [t.type for t in stored(db, org)] == ["echo"]
    assert consistent(db, org) == (0, 1)


def test_a_key_whose_first_item_was_invalid_is_free_for_a_later_one(
    client: FlaskClient, db: Database, org: Org
) -> None:
    data = entries(
        client, org, [{"type": "sleep", "idempotencyKey": "k"}, {"type": "echo", "idempotencyKey": "k"}]
    )
    assert statuses(data) == [400, 202]


def test_the_key_of_an_expired_task_makes_a_new_task(client: FlaskClient, db: Database, org: Org) -> None:
    body = {"type": "echo", "input": 1, "idempotencyKey": "old"}
    first = client.post("/v1/tasks", json=body, headers=org.headers).get_json()["taskId"]
    with db.session() as s:
        s.execute(update(Task).where(Task.id == first).values(expires_at=utcnow()))
    data = entries(client, org, [body, body])
    assert statuses(data) == [202, 200]
    assert data[0]["task"]["taskId"] != first


def test_keys_are_scoped_to_the_organization(client: FlaskClient, db: Database, org: Org) -> None:
    other = make_org(db, "other")
    body = {"type": "echo", "idempotencyKey": "shared"}
    assert statuses(entries(client, org, [body])) == [202]
    assert statuses(entries(client, other, [body])) == [202]


def test_a_key_lost_to_a_concurrent_submission_replays_the_winner_and_keeps_the_others(
    client: FlaskClient, db: Database, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a unique index decides (PostgreSQL; SQLite serialises writers): forced by a stale read."""
    winner = client.post("/v1/tasks", json={"type": "echo", "idempotencyKey": "b"}, headers=org.headers)
    real = submission._by_keys
    monkeypatch.setattr(submission, "_by_keys", lambda s, o, k: {})  # as if read before it committed
    items = [{"type": "echo", "idempotencyKey": k} for k in ("a", "b", "c")]
    data = entries(
        client, org, [*items, {"type": "echo"}, {"type": "echo", "input": 2, "idempotencyKey": "b"}]
    )
    assert statuses(data) == [202, 200, 202, 202, 422]
    assert data[1]["task"]["taskId"] == winner.get_json()["taskId"]
    assert consistent(db, org) == (996, 4)
    monkeypatch.setattr(submission, "_by_keys", real)


# -- one transaction, one Redis round trip ----------------------------------------------------------


def test_a_failure_inside_the_transaction_leaves_nothing(
    client: FlaskClient,
    db: Database,
    org: Org,
    publisher: RecordingPublisher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash at the last statement of the batch (the ledger's INSERT) rolls back every item."""
    from app.services import statements

    real = statements.INSERT_LEDGER
    monkeypatch.setattr(statements, "INSERT_LEDGER", None)  # executing None raises inside the transaction
    items = [{"type": "echo", "idempotencyKey": "k"}, {"type": "echo"}, {"type": "echo"}]
    r = post_batch(client, org, items)
    assert r.status_code == 500
    monkeypatch.setattr(statements, "INSERT_LEDGER", real)
    assert stored(db, org) == [] and publisher.tasks == []
    assert consistent(db, org) == (1000, 0)
    # The key was not taken.
    assert statuses(entries(client, org, items)) == [202, 202, 202]


def test_with_redis_down_the_batch_is_accepted_and_the_sweep_enqueues_it(
    db: Database,
    settings: Settings,
    publisher: RecordingPublisher,
    fake_server: fakeredis.FakeServer,
    fake_redis: fakeredis.FakeRedis,
) -> None:
    app = create_app(
        settings.with_overrides(sweep_grace_seconds=0.0), db=db, publisher=publisher, redis_client=fake_redis
    )
    org = make_org(db)
    fake_server.connected = False
    data = entries(app.test_client(), org, [{"type": "echo", "input": i} for i in range(5)])
    assert statuses(data) == [202] * 5 and publisher.tasks == []
    fake_server.connected = True
    wb = app.extensions["waybill"]
    wb.dispatcher.mark_epoch()  # Redis kept its state; it was only unreachable
    done = sweep.run_sweep(wb)
    assert done["tasks"] == 5  # confirmed against Redis and enqueued, like any submission's
    ids = [e["task"]["taskId"] for e in data]
    released = wb.dispatcher.redis.lrange(keys.waiting_key(org.id), 0, -1)
    assert sorted(publisher.tasks + [t.decode() for t in released]) == sorted(ids)
    with db.read_session() as s:
        assert all(t.dispatched_at is not None for t in s.execute(select(Task)).scalars())


def test_the_accepted_tasks_go_to_redis_in_one_round_trip(
    client: FlaskClient, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    executed: list[int] = []
    real = fakeredis.FakeRedis.pipeline

    def pipeline(self: Any, *a: Any, **kw: Any) -> Any:
        pipe = real(self, *a, **kw)
        execute = pipe.execute

        def counted(*ea: Any, **ekw: Any) -> Any:
            executed.append(len(pipe.command_stack))
            return execute(*ea, **ekw)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(fakeredis.FakeRedis, "pipeline", pipeline)
    client.application.extensions["waybill"].dispatcher.load_scripts()
    data = entries(client, org, [{"type": "echo"}] * 50 + [{"type": "nope"}])
    assert statuses(data) == [202] * 50 + [400]
    assert executed == [51]  # 50 enqueues and one step


# -- dispatch: enqueue_many_and_step --------------------------------------------------------------


def test_enqueue_many_and_step_is_each_enqueue_in_order_then_one_step(r: fakeredis.FakeRedis) -> None:
    d = Dispatcher(r, DispatchSettings(queue_target=2))
    assert d.enqueue_many_and_step("A", ["a0", "a1", "a2"], 5) == ["a0", "a1"]
    assert d.enqueue_many_and_step("A", ["a0", "a2", "a3"], 5) == []  # leased or waiting: not twice
    assert r.lrange(keys.waiting_key("A"), 0, -1) == [b"a2", b"a3"]
    r.script_flush()  # Redis restarted: the scripts are loaded and the whole pipeline runs again
    assert d.enqueue_many_and_step("B", ["b0"], 5) == []
    assert r.lrange(keys.waiting_key("B"), 0, -1) == [b"b0"]
    assert r.hget(keys.CLIMIT, "B") == b"5"


def test_enqueue_many_publishes_what_the_step_released_and_survives_redis_away(
    r: fakeredis.FakeRedis, publisher: RecordingPublisher
) -> None:
    d = Dispatcher(r, DispatchSettings(queue_target=3))
    dispatch = Dispatch(lambda: d, publisher)
    assert dispatch.enqueue_many(["a0", "a1", "a2", "a3"], "A", 10)
    assert publisher.tasks == ["a0", "a1", "a2"]
    assert dispatch.enqueue_many([], "A", 10)
    server = fakeredis.FakeServer()
    server.connected = False
    away = Dispatch(lambda: Dispatcher(fakeredis.FakeRedis(server=server)), publisher)
    assert not away.enqueue_many(["b0"], "B", 10)  # logged, left to the sweep


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


# -- concurrency ------------------------------------------------------------------------------------


def _in_threads(app: Flask, calls: list[Callable[[FlaskClient], Any]]) -> list[Any]:
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        client = app.test_client()
        barrier.wait()
        try:
            results[i] = calls[i](client)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_batches_and_single_submissions_racing_for_credits_and_keys_stay_exact(
    app: Flask, db: Database
) -> None:
    org = make_org(db, "racing", credits=150)
    shared = [{"type": "echo", "input": "same", "idempotencyKey": f"shared-{i}"} for i in range(20)]

    def batch(n: int, reverse: bool) -> Callable[[FlaskClient], Any]:
        # Half the batches hold the shared keys in the other order: no deadlock either way.
        keyed = shared[::-1] if reverse else shared
        items = [*keyed, *({"type": "echo", "input": [n, i]} for i in range(40))]
        return lambda c: [e["status"] for e in entries(c, org, items)]

    def single(i: int) -> Callable[[FlaskClient], Any]:
        body = shared[i % 20] if i % 2 else {"type": "echo", "input": i}
        return lambda c: [c.post("/v1/tasks", json=body, headers=org.headers).status_code]

    calls = [batch(n, reverse=n % 2 == 1) for n in range(4)] + [single(i) for i in range(20)]
    answers = Counter(s for result in _in_threads(app, calls) for s in result)
    tasks = stored(db, org)
    # 190 tasks asked for, 150 credits: exactly 150 tasks, at most one per shared key.
    held = [t.idempotency_key for t in tasks if t.idempotency_key]
    assert len(held) == len(set(held))
    assert len(tasks) == 150 == answers[202]
    assert sum(answers.values()) == 4 * 60 + 20 and set(answers) <= {200, 202, 402}
    assert consistent(db, org) == (0, 150)
