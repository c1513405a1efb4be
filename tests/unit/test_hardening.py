"""Issue 12: every accepted task ends, and no request answers 500, whatever the input.

Each test here failed on the code before the hardening: inputs that jam a
worker, bytes PostgreSQL cannot store, URLs no test had tried, a limiter
that locked out good keys, and a run or an attempt that raised where it
should not have.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text, update
from sqlalchemy.exc import DataError

from app.db import Database
from app.dispatch import keys
from app.models import Task, WebhookAttempt, WebhookDelivery
from app.models.base import utcnow
from app.services import deliveries, json_limits, lifecycle, outbound, submission
from app.services.task_types import Registry, TaskContext, TaskType
from app.usecases import run
from config import Settings
from tests.support import Org, Receiver, answer_no_content
from tests.support.orgs import ledger_sum
from tests.support.orgs import organization as org_row
from tests.unit.test_api import assert_problem

REGISTRY = Registry.from_entry_points()
RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def submit(db: Database, org: Org, registry: Registry = REGISTRY, **kw: Any) -> str:
    kw.setdefault("type", "echo")
    with db.session() as s:
        return submission.submit(s, org.id, submission.SubmitRequest(**kw), registry=registry).task.id


def raising(exc: BaseException) -> Callable[..., Any]:
    """A stand-in for a function that raises ``exc`` whatever it is called with."""

    def stand_in(*_a: Any, **_k: Any) -> Any:
        raise exc

    return stand_in


def task_row(db: Database, task_id: str) -> Any:
    with db.session() as s:
        return s.execute(
            select(Task.status, Task.error_code, Task.refunded, Task.lease_expires_at).where(
                Task.id == task_id
            )
        ).one()


# -- input limits: 32 levels, no U+0000, named in the 400 -----------------------


@pytest.mark.parametrize("field", ["input", "metadata"])
def test_32_levels_are_accepted_and_33_refused_naming_the_field(
    client: FlaskClient, org: Org, field: str
) -> None:
    ok = client.post("/v1/tasks", json={"type": "echo", field: nested(32)}, headers=org.headers)
    assert ok.status_code == 202, ok.get_data(as_text=True)
    r = client.post("/v1/tasks", json={"type": "echo", field: nested(33)}, headers=org.headers)
    body = assert_problem(r, 400)
    (where,) = body["errors"]
    assert where.startswith(field) and "32 levels" in body["errors"][where][0]
    assert where in body["detail"]


def test_an_input_deep_enough_to_break_the_parser_is_400_not_500(client: FlaskClient, org: Org) -> None:
    raw = '{"type": "echo", "input": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = client.post("/v1/tasks", data=raw, content_type="application/json", headers=org.headers)
    assert_problem(r, 400)
    assert client.get("/v1/tasks", headers=org.headers).get_json()["data"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "echo", "input": {"name": "a\u0000b"}}, "input.name"),
        ({"type": "echo", "input": ["ok", {"k\u0000": 1}]}, "input.1.k\u0000"),
        ({"type": "echo", "metadata": {"m": "\u0000"}}, "metadata.m"),
        ({"type": "echo", "idempotencyKey": "k\u0000"}, "idempotencyKey"),
    ],
)
def test_nul_anywhere_in_the_body_is_400_naming_the_field(
    client: FlaskClient, org: Org, body: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/tasks", json=body, headers=org.headers)
    problem = assert_problem(r, 400)
    assert field in problem["errors"], problem
    assert client.get("/v1/tasks", headers=org.headers).get_json()["data"] == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/tasks/task_%00",
        "/v1/tasks/task_01jf%00/cancel",
        "/v1/tasks/task_%00/deliveries",
    ],
)
def test_nul_in_a_path_is_404_on_every_database(client: FlaskClient, org: Org, path: str) -> None:
    method = client.post if path.endswith("cancel") else client.get
    assert_problem(method(path, headers=org.headers), 404)


@pytest.mark.parametrize("query", ["type=%00", "idempotencyKey=a%00", "status=%00", "x%00=1"])
def test_nul_in_a_query_is_400_naming_the_parameter(client: FlaskClient, org: Org, query: str) -> None:
    body = assert_problem(client.get(f"/v1/tasks?{query}", headers=org.headers), 400)
    assert body["errors"] and "U+0000" in json.dumps(body["errors"])


def test_a_cursor_decoding_to_nul_or_garbage_is_400(client: FlaskClient, org: Org) -> None:
    for raw in ("task_\x00", "task_" + "z" * 26, "task_01JF\x00" + "0" * 17):
        cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
        body = assert_problem(client.get(f"/v1/tasks?cursor={cursor}", headers=org.headers), 400)
        assert "cursor" in body["errors"]


def test_a_number_field_refuses_a_string(client: FlaskClient, org: Org) -> None:
    r = client.post("/v1/tasks", json={"type": "sleep", "input": {"seconds": "5"}}, headers=org.headers)
    body = assert_problem(r, 400)
    assert body["errors"] == {"input.seconds": ["Must be of type number."]}
    assert body["detail"].startswith("input.seconds")


def test_every_400_detail_names_the_first_bad_field(client: FlaskClient, org: Org) -> None:
    r = client.post("/v1/tasks", json={"type": "sleep", "input": {"seconds": 9999}}, headers=org.headers)
    body = assert_problem(r, 400)
    assert body["detail"] != body["title"] and body["detail"].startswith("input.seconds")


# -- bodies over the limit ----------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_413_not_truncated(
    app: Flask, client: FlaskClient, org: Org
) -> None:
    limit = app.extensions["waybill"].settings.max_body_bytes
    # Valid JSON up to the limit, then more: cut at the limit it would still parse.
    raw = b'{"type": "echo", "input": "' + b"x" * (limit - 40) + b'"}' + b" " * 100
    environ = {"wsgi.input": io.BytesIO(raw), "HTTP_TRANSFER_ENCODING": "chunked"}
    r = client.post(
        "/v1/tasks",
        headers={**org.headers, "Content-Type": "application/json"},
        environ_overrides=environ,
    )
    assert_problem(r, 413)
    assert client.get("/v1/tasks", headers=org.headers).get_json()["data"] == []


def test_a_body_over_the_limit_is_read_before_the_413(app: Flask, client: FlaskClient, org: Org) -> None:
    limit = app.extensions["waybill"].settings.max_body_bytes
    stream = io.BytesIO(b"x" * (limit * 2))
    r = client.post(
        "/v1/tasks",
        headers={**org.headers, "Content-Type": "application/json", "Content-Length": str(limit * 2)},
        environ_overrides={"wsgi.input": stream, "CONTENT_LENGTH": str(limit * 2)},
    )
    assert_problem(r, 413)
    # Drained: a client still writing reads the answer instead of a reset.
    assert stream.tell() == limit * 2
    assert "close" not in r.headers.get("Connection", "")


# -- idempotency keys of expired tasks ---------------------------------------------------


def test_the_key_of_an_expired_task_makes_a_new_task(client: FlaskClient, org: Org, db: Database) -> None:
    body = {"type": "echo", "input": 1, "idempotencyKey": "order-1"}
    first = client.post("/v1/tasks", json=body, headers=org.headers).get_json()["taskId"]
    with db.session() as s:
        s.execute(update(Task).where(Task.id == first).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert_problem(client.get(f"/v1/tasks/{first}", headers=org.headers), 404)
    again = client.post("/v1/tasks", json=body, headers=org.headers)
    assert again.status_code == 202 and again.get_json()["taskId"] != first
    assert "Idempotent-Replayed" not in again.headers


# -- the failed-authentication limiter ------------------------------------------------------


def test_the_limiter_counts_the_client_behind_trusted_proxies(
    app: Flask, db: Database, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.api.plumbing as requests_module
    from app import create_app

    monkeypatch.setattr(requests_module.time, "time", lambda: 1_800_000_090.0)
    wb = app.extensions["waybill"]
    proxied = create_app(
        wb.settings.__class__(**{**wb.settings.__dict__, "trusted_proxy_hops": 1}),
        db=db,
        publisher=wb.publisher,
        redis_client=wb.redis_client,
    ).test_client()
    limit = wb.settings.auth_failures_per_minute
    bad = {"Authorization": "Bearer wb_nope"}

    def from_client(address: str, spoofed: str = "6.6.6.6") -> dict[str, str]:
        # The client's own claim comes first; the proxy appends what it saw.
        return {"X-Forwarded-For": f"{spoofed}, {address}"}

    for _ in range(limit):
        assert proxied.get("/v1/tasks", headers={**bad, **from_client("1.2.3.4")}).status_code == 401
    assert proxied.get("/v1/tasks", headers={**bad, **from_client("1.2.3.4")}).status_code == 429
    # Another client behind the same proxy, and the spoofed address, are not blocked.
    assert proxied.get("/v1/tasks", headers={**bad, **from_client("5.6.7.8")}).status_code == 401
    assert proxied.get("/v1/tasks", headers={**bad, **from_client("9.9.9.9", "1.2.3.4")}).status_code == 401
    assert proxied.get("/v1/tasks", headers={**org.headers, **from_client("1.2.3.4")}).status_code == 200


# -- /metrics ---------------------------------------------------------------------------------


def test_concurrent_scrapes_without_a_multiprocess_dir_all_answer(
    app: Flask, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def scrape() -> None:
        c = app.test_client()
        barrier.wait()
        for _ in range(5):
            statuses.append(c.get("/metrics").status_code)

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * 40


def test_metrics_hide_organization_ids_unless_the_token_is_required(
    app: Flask, client: FlaskClient, org: Org, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    submit(db, org)
    open_text = client.get("/metrics").get_data(as_text=True)
    assert org.id not in open_text
    assert 'waybill_organization_waiting{organization="all"} 1.0' in open_text

    wb = app.extensions["waybill"]
    wb.settings = wb.settings.__class__(**{**wb.settings.__dict__, "metrics_token": "s3cret"})
    assert_problem(client.get("/metrics"), 401)
    assert_problem(client.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
    shown = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert shown.status_code == 200 and org.id in shown.get_data(as_text=True)


# -- PostgreSQL's isolation level is Waybill's, not the server's default ----------------------


def test_postgresql_sessions_read_committed_whatever_the_server_default(migrated: str) -> None:
    if not migrated.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    from sqlalchemy.engine import make_url

    url = make_url(migrated).update_query_dict(
        {"options": "-c default_transaction_isolation=repeatable\\ read"}
    )
    database = Database(url.render_as_string(hide_password=False))
    try:
        with database.engine.connect() as conn:
            # The server default really is the one that broke idempotent races.
            assert conn.exec_driver_sql("SHOW default_transaction_isolation").scalar() == "repeatable read"
        with database.session() as s:
            assert s.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
    finally:
        database.dispose()


def test_concurrent_identical_submissions_under_repeatable_read_default_replay(
    migrated: str, db: Database, org: Org, settings: Any, publisher: Any, fake_redis: Any
) -> None:
    if not migrated.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    from sqlalchemy.engine import make_url

    from app import create_app

    url = make_url(migrated).update_query_dict(
        {"options": "-c default_transaction_isolation=repeatable\\ read"}
    )
    database = Database(url.render_as_string(hide_password=False))
    flask_app = create_app(settings, db=database, publisher=publisher, redis_client=fake_redis)
    body = {"type": "echo", "input": {"n": 1}, "idempotencyKey": "race"}
    answers: list[tuple[int, str]] = []
    barrier = threading.Barrier(8)

    def post() -> None:
        c = flask_app.test_client()
        barrier.wait()
        r = c.post("/v1/tasks", json=body, headers=org.headers)
        answers.append((r.status_code, (r.get_json() or {}).get("taskId", "")))

    try:
        threads = [threading.Thread(target=post) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        database.dispose()
    assert sorted(s for s, _ in answers) == [200] * 7 + [202]
    assert len({t for _, t in answers}) == 1


# -- outbound targets -------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["fec0::1", "feff::1", "3fff::1", "::ffff:fec0:1"])
def test_site_local_and_documentation_ipv6_are_refused(address: str) -> None:
    import ipaddress

    assert outbound.is_forbidden_address(ipaddress.ip_address(address))
    with pytest.raises(outbound.UnsafeTarget):
        outbound.check_url(f"http://[{address}]/hook", allow_private=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(answer_no_content) as r:
        yield r


def test_a_webhook_url_with_a_non_ascii_path_is_delivered_percent_encoded(
    db: Database, org: Org, receiver: Receiver
) -> None:
    url = f"{receiver.url}/café/ü?q=é"
    task_id = submit(db, org, webhook_url=url)
    delivery_id = run.execute(db, REGISTRY, RUN, task_id).delivery_id
    assert delivery_id is not None
    with db.session() as s:
        plan = deliveries.claim_attempt(s, delivery_id, hold_seconds=30)
    assert plan is not None
    result = deliveries.send_attempt(plan, timeout=5, allow_private=True)
    assert result.outcome == "delivered", result
    assert [r.path for r in receiver.received] == ["/caf%C3%A9/%C3%BC?q=%C3%A9"]


def test_any_exception_of_an_attempt_is_a_recorded_failed_attempt(
    db: Database, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = submit(db, org, webhook_url="https://hooks.example/x")
    delivery_id = run.execute(db, REGISTRY, RUN, task_id).delivery_id
    assert delivery_id is not None

    monkeypatch.setattr(outbound, "request", raising(UnicodeEncodeError("ascii", "é", 0, 1, "not ASCII")))
    with db.session() as s:
        plan = deliveries.claim_attempt(s, delivery_id, hold_seconds=30)
    assert plan is not None
    result = deliveries.send_attempt(plan, timeout=1, allow_private=False)
    assert result.outcome == "error" and "UnicodeEncodeError" in (result.error or "")
    with db.session() as s:
        countdown = deliveries.record_attempt(s, plan, result, retry_base_seconds=120)
    assert countdown is not None  # retried on the usual schedule, not forever
    with db.session() as s:
        (attempt,) = s.execute(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
        ).scalars()
        assert attempt.outcome == "error"


def test_a_delivery_whose_claim_keeps_raising_fails_after_its_attempts(
    db: Database, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import tasks as worker_tasks

    task_id = submit(db, org, webhook_url="https://hooks.example/x")
    delivery_id = run.execute(db, REGISTRY, RUN, task_id).delivery_id
    assert delivery_id is not None

    published: list[tuple[str, float | None]] = []

    class NoRedis(SimpleNamespace):
        @property
        def redis(self) -> object:
            # As a container without Redis answers: delivery then goes without
            # its isolation bounds (docs/webhooks.rst), and must still end.
            raise RuntimeError("no Redis configured")

    wb = NoRedis(
        db=db,
        settings=Settings().with_overrides(
            webhook_timeout_seconds=1.0, webhook_allow_private=False, webhook_retry_base_seconds=1.0
        ),
        dispatch=SimpleNamespace(deliver=lambda d, c=None: published.append((d, c))),
    )
    monkeypatch.setattr(worker_tasks, "current", lambda: wb)
    monkeypatch.setattr(
        deliveries,
        "claim_attempt",
        raising(RecursionError("maximum recursion depth exceeded while decoding")),
    )
    for _ in range(5):
        with db.session() as s:  # each retry is due now
            s.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
        assert worker_tasks.deliver_webhook.run(delivery_id) == "error"
    with db.session() as s:
        delivery = s.get(WebhookDelivery, delivery_id)
        assert delivery is not None and delivery.status == "failed" and delivery.attempts == 5
        assert s.get(Task, task_id).webhook_status == "failed"  # type: ignore[union-attr]
    assert len(published) == 4  # four retries scheduled, none after the last


# -- a run that raises anywhere ends as a recorded failure ---------------------------------------


def _assert_failed_and_refunded(db: Database, org: Org, task_id: str, code: str) -> None:
    row = task_row(db, task_id)
    assert (row.status, row.error_code, row.refunded, row.lease_expires_at) == ("failed", code, True, None)
    o = org_row(db, org.id)
    assert (o.queued, o.running, o.credits) == (0, 0, 1000)
    assert ledger_sum(db, org.id) == 1000


@pytest.mark.parametrize(
    ("step", "exc", "code"),
    [
        ("claim", RecursionError("maximum recursion depth exceeded"), "claim_failed"),
        (
            "record_result",
            DataError("INSERT", {}, ValueError("unsupported Unicode escape")),
            "result_not_storable",
        ),
    ],
)
def test_a_step_that_raises_fails_the_task_and_refunds(
    db: Database, org: Org, monkeypatch: pytest.MonkeyPatch, step: str, exc: Exception, code: str
) -> None:
    task_id = submit(db, org, webhook_url="https://hooks.example/x")
    monkeypatch.setattr(lifecycle, step, raising(exc))
    outcome = run.execute(db, REGISTRY, RUN, task_id)
    assert outcome.recorded and outcome.status == "failed"
    assert outcome.delivery_id is not None  # the task.failed event is sent like any other
    _assert_failed_and_refunded(db, org, task_id, code)


def test_a_database_that_is_away_is_still_retried_not_failed(
    db: Database, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    task_id = submit(db, org)

    monkeypatch.setattr(
        lifecycle,
        "claim",
        raising(OperationalError("SELECT", {}, ConnectionError("server closed the connection"))),
    )
    with pytest.raises(OperationalError):
        run.execute(db, REGISTRY, RUN, task_id)
    assert task_row(db, task_id).status == "queued"


def _nul_result(_input: Any, _ctx: TaskContext) -> Any:
    return {"body": "a\u0000b"}


def _deep_result(_input: Any, _ctx: TaskContext) -> Any:
    return nested(json_limits.MAX_RESULT_DEPTH + 1)


@pytest.mark.parametrize("handler", [_nul_result, _deep_result])
def test_a_result_no_database_can_store_fails_the_task_cleanly(db: Database, org: Org, handler: Any) -> None:
    registry = Registry([*REGISTRY, TaskType(name="bad_result", cost=1, description="x", handler=handler)])
    task_id = submit(db, org, registry=registry, type="bad_result")
    outcome = run.execute(db, registry, RUN, task_id)
    assert outcome.recorded and outcome.status == "failed"
    _assert_failed_and_refunded(db, org, task_id, "result_invalid")


def test_http_fetch_returns_a_body_with_nul_as_storable_text(
    db: Database, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.task_types import http_fetch

    def fake(*_a: Any, **_k: Any) -> outbound.Response:
        return outbound.Response(200, [("Content-Type", "text/plain")], b"a\x00b\xff", False, 1)

    monkeypatch.setattr(outbound, "request", fake)
    task_id = submit(db, org, type="http.fetch", input={"url": "https://example.com/"})
    outcome = run.execute(db, REGISTRY, RUN, task_id)
    assert outcome.recorded and outcome.status == "succeeded"
    with db.session() as s:
        task = s.get(Task, task_id)
        assert task is not None and task.result["body"] == "a\ufffdb\ufffd"
    assert http_fetch.TASK_TYPE.name == "http.fetch"


def test_a_stored_input_that_cannot_be_decoded_fails_the_task(db: Database, org: Org) -> None:
    """A poison input accepted before the limits existed: too deep to decode in a worker."""
    task_id = submit(db, org, webhook_url="https://hooks.example/x")
    deep = "[" * 5000 + "]" * 5000
    with db.session() as s:
        if s.bind.dialect.name == "postgresql":  # type: ignore[union-attr]
            s.execute(
                text("UPDATE tasks SET input = CAST(:v AS JSONB) WHERE id = :id"), {"v": deep, "id": task_id}
            )
        else:
            s.execute(text("UPDATE tasks SET input = :v WHERE id = :id"), {"v": deep, "id": task_id})
    outcome = run.execute(db, REGISTRY, RUN, task_id)
    assert outcome.recorded and outcome.status == "failed" and outcome.delivery_id is not None
    _assert_failed_and_refunded(db, org, task_id, "input_unreadable")
    with db.session() as s:
        delivery = s.get(WebhookDelivery, outcome.delivery_id)
        assert delivery is not None and delivery.payload["data"]["input"] is None


def test_redelivering_a_task_without_a_webhook_says_so(client: FlaskClient, org: Org, db: Database) -> None:
    task_id = submit(db, org)
    run.execute(db, REGISTRY, RUN, task_id)
    body = assert_problem(client.post(f"/v1/tasks/{task_id}/deliveries", headers=org.headers), 409)
    assert "without a webhook" in body["detail"]


def test_readyz_warns_when_redis_may_evict_dispatch_state(
    client: FlaskClient, fake_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_redis, "config_get", lambda _name: {"maxmemory-policy": "allkeys-lru"})
    r = client.get("/readyz")
    assert r.status_code == 200  # a warning, not unreadiness
    assert r.get_json()["checks"]["redisEviction"].startswith("warning: maxmemory-policy is allkeys-lru")


# -- a Redis that comes back from an older snapshot -------------------------------------------------


def test_a_redis_rolled_back_to_an_older_snapshot_loses_no_confirmed_task(
    app: Flask, client: FlaskClient, db: Database, org: Org, fake_redis: Any, publisher: Any, monkeypatch: Any
) -> None:
    from workers import tasks as worker_tasks

    wb = app.extensions["waybill"]
    monkeypatch.setattr(worker_tasks, "current", lambda: wb)
    worker_tasks.sweep_task.run()  # an empty Redis: rebuilt, and its epoch set
    snapshot = {key: fake_redis.dump(key) for key in fake_redis.keys("*")}
    assert keys.EPOCH.encode() in snapshot

    # Submitted (and so released by dispatch) after the snapshot was taken.
    task_id = client.post("/v1/tasks", json={"type": "echo"}, headers=org.headers).get_json()["taskId"]
    assert publisher.tasks == [task_id]
    with db.session() as s:  # older than the sweep's grace period
        s.execute(update(Task).values(created_at=utcnow() - timedelta(minutes=1)))
    worker_tasks.sweep_task.run()  # the sweep confirms it: dispatched_at is set
    with db.session() as s:
        assert s.get(Task, task_id).dispatched_at is not None  # type: ignore[union-attr]
    assert wb.dispatcher.missing([task_id]) == []

    # Redis restarts from the older snapshot: its epoch is there, the task is not.
    fake_redis.flushall()
    for key, value in snapshot.items():
        fake_redis.restore(key, 0, value)
    assert wb.dispatcher.missing([task_id]) == [task_id]
    publisher.tasks.clear()
    report = worker_tasks.sweep_task.run()
    assert report["restored"] == 1 and report["verified"] == 1
    assert wb.dispatcher.missing([task_id]) == []
    assert publisher.tasks == [task_id]  # released to a worker again
    assert task_row(db, task_id).status == "queued"


def test_the_verification_walk_is_bounded_and_resumes_where_it_stopped(
    app: Flask, db: Database, org: Org, fake_redis: Any
) -> None:
    from app.usecases.recovery import verify_queued

    ids = [submit(db, org) for _ in range(7)]
    with db.session() as s:
        s.execute(update(Task).values(created_at=utcnow() - timedelta(minutes=1)))
    dispatcher = app.extensions["waybill"].dispatcher
    assert dispatcher.missing(ids) == ids  # never enqueued: Redis lost them all
    assert verify_queued(db, dispatcher, grace_seconds=10, batches=1, batch=3) == (3, 3)
    assert dispatcher.missing(ids) == ids[3:]  # one batch per call, in id order
    assert verify_queued(db, dispatcher, grace_seconds=10, batches=2, batch=3) == (4, 4)
    assert dispatcher.missing(ids) == []
    assert dispatcher.verify_cursor() == ""  # the end of the table: the next walk starts over
