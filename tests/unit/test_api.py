"""The HTTP contract of ../shared/spec/api.md, through Flask's test client."""

from __future__ import annotations

import json
import time

import pytest
from flask.testing import FlaskClient

from app.db import Database
from app.dispatch import keys
from tests.conftest import RecordingPublisher
from tests.support import Org, make_org


def submit(client: FlaskClient, org: Org, body: object, **headers: str):
    return client.post("/v1/tasks", json=body, headers={**org.headers, **headers})


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    return body


def test_submit_answers_202_with_the_queued_task_and_publishes_it(
    client: FlaskClient, org: Org, publisher: RecordingPublisher
) -> None:
    r = submit(client, org, {"type": "echo", "input": {"hello": "world"}, "metadata": {"m": 1}})
    assert r.status_code == 202
    task = r.get_json()
    assert task["status"] == "queued"
    assert task["input"] == {"hello": "world"}
    assert task["metadata"] == {"m": 1}
    assert task["cost"] == 1
    assert "result" not in task and "error" not in task
    assert r.headers["Location"] == f"/v1/tasks/{task['taskId']}"
    assert task["createdAt"].endswith("Z")
    assert publisher.tasks == [task["taskId"]]
    polled = client.get(f"/v1/tasks/{task['taskId']}", headers=org.headers)
    assert polled.status_code == 200
    assert polled.get_json() == task


def test_task_ids_are_url_safe_and_unguessable(client: FlaskClient, org: Org) -> None:
    ids = {submit(client, org, {"type": "echo"}).get_json()["taskId"] for _ in range(20)}
    assert len(ids) == 20
    for task_id in ids:
        assert task_id.replace("_", "").isalnum()
        assert len(task_id) >= 26


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "type"),
        ({"type": "nope"}, "type"),
        ({"type": "sleep", "input": {"seconds": 301}}, "input.seconds"),
        ({"type": "sleep", "input": {"seconds": "x"}}, "input.seconds"),
        ({"type": "sleep"}, "input.seconds"),
        ({"type": "sleep", "input": [1]}, "input"),
        ({"type": "http.fetch", "input": {"url": "ftp://example.com/"}}, "input.url"),
        ({"type": "http.fetch", "input": {"url": "https://example.com", "method": "POST"}}, "input.method"),
        ({"type": "echo", "webhook": {"url": "file:///etc/passwd"}}, "webhook.url"),
        ({"type": "echo", "webhook": {}}, "webhook.url"),
        ({"type": "echo", "idempotencyKey": ""}, "idempotencyKey"),
        ({"type": "echo", "idempotencyKey": "a" * 256}, "idempotencyKey"),
        ({"type": "echo", "idempotencyKey": "tab\there"}, "idempotencyKey"),
        ({"type": "echo", "metadata": "x"}, "metadata"),
        ({"type": "echo", "metadata": {"k": "v" * 5000}}, "metadata"),
        ({"type": "echo", "surprise": 1}, "surprise"),
    ],
)
def test_bad_input_is_400_with_errors_and_stores_nothing(
    client: FlaskClient, org: Org, publisher: RecordingPublisher, body: dict, field: str
) -> None:
    body_ = assert_problem(submit(client, org, body), 400)
    assert field in body_["errors"], body_
    listed = client.get("/v1/tasks", headers=org.headers).get_json()
    assert listed["data"] == []
    assert publisher.tasks == []
    assert client.get("/v1/organization", headers=org.headers).get_json()["credits"] == 1000


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[1,2]", b'"text"', b"\xff\xfe", b'{"type": NaN}', b'{"type": "echo", "input": "\\u0000"}'],
)
def test_malformed_json_is_400(client: FlaskClient, org: Org, raw: bytes) -> None:
    r = client.post("/v1/tasks", data=raw, headers={**org.headers, "Content-Type": "application/json"})
    assert_problem(r, 400)


def test_deeply_nested_json_is_400_not_500(client: FlaskClient, org: Org) -> None:
    raw = b'{"type": "echo", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/v1/tasks", data=raw, headers={**org.headers, "Content-Type": "application/json"})
    assert r.status_code in (400, 413)


def test_not_json_is_415(client: FlaskClient, org: Org) -> None:
    r = client.post("/v1/tasks", data="type=echo", headers={**org.headers, "Content-Type": "text/plain"})
    assert_problem(r, 415)
    r = client.post("/v1/tasks", data="{}", headers=org.headers)
    assert_problem(r, 415)


def test_body_over_the_limit_is_413(client: FlaskClient, org: Org) -> None:
    raw = json.dumps({"type": "echo", "input": "x" * 1_100_000})
    r = client.post("/v1/tasks", data=raw, headers={**org.headers, "Content-Type": "application/json"})
    assert_problem(r, 413)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wb_nope_nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer "},
    ],
)
def test_missing_or_unknown_key_is_401(client: FlaskClient, headers: dict) -> None:
    for method, path in [("get", "/v1/tasks"), ("post", "/v1/tasks"), ("get", "/v1/organization")]:
        r = getattr(client, method)(path, headers=headers, json={"type": "echo"})
        body = assert_problem(r, 401)
        assert "wb_" not in json.dumps(body)


def test_revoked_key_is_401(client: FlaskClient, db: Database, org: Org) -> None:
    from sqlalchemy import select

    from app.models import ApiKey
    from app.services import organizations

    with db.session() as s:
        key_id = s.execute(select(ApiKey.id).where(ApiKey.organization_id == org.id)).scalar_one()
        organizations.revoke_api_key(s, key_id)
    assert_problem(client.get("/v1/tasks", headers=org.headers), 401)


def test_another_organizations_task_is_a_404_identical_to_a_missing_one(
    client: FlaskClient, db: Database, org: Org
) -> None:
    other = make_org(db, "other")
    task_id = submit(client, other, {"type": "echo"}).get_json()["taskId"]
    theirs = client.get(f"/v1/tasks/{task_id}", headers=org.headers)
    missing = client.get("/v1/tasks/task_01jdx00000000000000000000", headers=org.headers)
    assert_problem(theirs, 404)
    assert theirs.get_data() == missing.get_data()
    assert_problem(client.post(f"/v1/tasks/{task_id}/cancel", headers=org.headers), 404)
    assert_problem(client.get(f"/v1/tasks/{task_id}/deliveries", headers=org.headers), 404)


def test_list_is_newest_first_with_stable_cursor_pages(client: FlaskClient, org: Org) -> None:
    ids = [submit(client, org, {"type": "echo", "input": i}).get_json()["taskId"] for i in range(7)]
    page1 = client.get("/v1/tasks?limit=3", headers=org.headers).get_json()
    assert [t["taskId"] for t in page1["data"]] == ids[::-1][:3]
    # New tasks arriving between pages do not shift the next page.
    submit(client, org, {"type": "echo", "input": "late"})
    page2 = client.get(f"/v1/tasks?limit=3&cursor={page1['nextCursor']}", headers=org.headers).get_json()
    assert [t["taskId"] for t in page2["data"]] == ids[::-1][3:6]
    page3 = client.get(f"/v1/tasks?limit=3&cursor={page2['nextCursor']}", headers=org.headers).get_json()
    assert [t["taskId"] for t in page3["data"]] == ids[:1]
    assert page3["nextCursor"] is None


def test_list_filters(client: FlaskClient, org: Org) -> None:
    submit(client, org, {"type": "echo", "idempotencyKey": "k-1"})
    submit(client, org, {"type": "sleep", "input": {"seconds": 1}})
    by_type = client.get("/v1/tasks?type=sleep", headers=org.headers).get_json()["data"]
    assert [t["type"] for t in by_type] == ["sleep"]
    by_key = client.get("/v1/tasks?idempotencyKey=k-1", headers=org.headers).get_json()["data"]
    assert [t["idempotencyKey"] for t in by_key] == ["k-1"]
    assert client.get("/v1/tasks?status=succeeded", headers=org.headers).get_json()["data"] == []
    assert len(client.get("/v1/tasks?status=queued", headers=org.headers).get_json()["data"]) == 2


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=101", "limit=x", "status=done", "cursor=%%%", "cursor=Zm9v"]
)
def test_bad_list_query_is_400(client: FlaskClient, org: Org, query: str) -> None:
    assert_problem(client.get(f"/v1/tasks?{query}", headers=org.headers), 400)


def test_organization_and_task_types(client: FlaskClient, org: Org) -> None:
    submit(client, org, {"type": "sleep", "input": {"seconds": 1}})
    body = client.get("/v1/organization", headers=org.headers).get_json()
    assert body == {
        "id": org.id,
        "name": "acme",
        "credits": 999,
        "queueLimit": 100_000,
        "queued": 1,
        "running": 0,
        "concurrencyLimit": 10,
    }
    types = {t["type"]: t for t in client.get("/v1/task-types", headers=org.headers).get_json()}
    assert set(types) >= {"echo", "sleep", "http.fetch"}
    sleep = types["sleep"]
    assert sleep["cost"] == 1 and sleep["description"]
    assert sleep["inputSchema"]["properties"]["seconds"]["maximum"] == 300
    assert sleep["inputSchema"]["required"] == ["seconds"]


def test_idempotent_replay_and_conflict(client: FlaskClient, org: Org, publisher: RecordingPublisher) -> None:
    body = {"type": "echo", "input": {"a": 1, "b": 2}, "idempotencyKey": "order-1"}
    first = submit(client, org, body)
    assert first.status_code == 202
    # Same request, keys in another order: a replay.
    again = submit(client, org, {"idempotencyKey": "order-1", "input": {"b": 2, "a": 1}, "type": "echo"})
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["taskId"] == first.get_json()["taskId"]
    assert publisher.tasks == [first.get_json()["taskId"]]
    conflict = submit(client, org, {**body, "input": {"a": 2}})
    problem = assert_problem(conflict, 422)
    assert "order-1" in problem["detail"]
    assert client.get("/v1/organization", headers=org.headers).get_json()["credits"] == 999


def test_idempotency_key_header_is_an_alias(client: FlaskClient, org: Org) -> None:
    first = submit(client, org, {"type": "echo"}, **{"Idempotency-Key": "h-1"})
    assert first.status_code == 202
    assert first.get_json()["idempotencyKey"] == "h-1"
    again = submit(client, org, {"type": "echo", "idempotencyKey": "h-1"})
    assert again.status_code == 200
    both = submit(client, org, {"type": "echo", "idempotencyKey": "x"}, **{"Idempotency-Key": "y"})
    assert_problem(both, 400)


def test_keys_are_scoped_to_the_organization(client: FlaskClient, db: Database, org: Org) -> None:
    other = make_org(db, "other")
    a = submit(client, org, {"type": "echo", "idempotencyKey": "same"})
    b = submit(client, other, {"type": "echo", "idempotencyKey": "same", "input": 5})
    assert a.status_code == b.status_code == 202


def test_not_enough_credits_is_402_naming_balance_and_cost(client: FlaskClient, db: Database) -> None:
    poor = make_org(db, "poor", credits=1)
    assert submit(client, poor, {"type": "echo"}).status_code == 202
    problem = assert_problem(
        submit(client, poor, {"type": "http.fetch", "input": {"url": "https://example.com"}}), 402
    )
    assert "0" in problem["detail"] and "2" in problem["detail"]
    assert problem["balance"] == 0 and problem["cost"] == 2


def test_full_queue_is_429_with_retry_after(client: FlaskClient, db: Database) -> None:
    small = make_org(db, "small", queue_limit=2)
    for _ in range(2):
        assert submit(client, small, {"type": "echo"}).status_code == 202
    r = submit(client, small, {"type": "echo"})
    problem = assert_problem(r, 429)
    assert problem["type"].endswith("queue-full")
    assert int(r.headers["Retry-After"]) >= 1
    assert client.get("/v1/organization", headers=small.headers).get_json()["credits"] == 998
    # The estimate follows the drain rate that dispatch records in Redis.
    dispatcher = client.application.extensions["waybill"].dispatcher
    dispatcher.redis.hset(keys.DRAIN, small.id, f"0.26:{int(time.time() * 1000)}")
    r = submit(client, small, {"type": "echo"})
    assert r.headers["Retry-After"] == "4"
    assert "Retry after 4 seconds" in assert_problem(r, 429)["detail"]


def test_publish_failure_still_answers_202(
    client: FlaskClient, org: Org, publisher: RecordingPublisher
) -> None:
    publisher.fail = True
    r = submit(client, org, {"type": "echo"})
    assert r.status_code == 202
    assert r.get_json()["status"] == "queued"


def test_cancel_a_queued_task_refunds_and_409_after(client: FlaskClient, org: Org) -> None:
    task = submit(client, org, {"type": "echo"}).get_json()
    r = client.post(f"/v1/tasks/{task['taskId']}/cancel", headers=org.headers)
    assert r.status_code == 200
    assert r.get_json()["status"] == "canceled"
    assert client.get("/v1/organization", headers=org.headers).get_json()["credits"] == 1000
    assert_problem(client.post(f"/v1/tasks/{task['taskId']}/cancel", headers=org.headers), 409)


def test_unknown_route_and_method_are_problems(client: FlaskClient, org: Org) -> None:
    assert_problem(client.get("/v1/nothing", headers=org.headers), 404)
    assert_problem(client.delete("/v1/tasks", headers=org.headers), 405)


def test_healthz_and_readyz(client: FlaskClient, fake_server) -> None:
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.get_json()["checks"] == {"database": "ok", "broker": "ok", "redisEviction": "ok"}
    fake_server.connected = False  # the broker goes away
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.get_json()["checks"]["database"] == "ok"
    assert r.get_json()["checks"]["broker"].startswith("unavailable")


def test_request_id_is_echoed(client: FlaskClient) -> None:
    r = client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    r = client.get("/healthz", headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["X-Request-Id"].startswith("req_")


def test_hostile_webhook_urls_are_refused_at_submission(client: FlaskClient, org: Org) -> None:
    from tests.unit.test_outbound import HOSTILE

    assert len(HOSTILE) >= 30
    for url in HOSTILE:
        r = submit(client, org, {"type": "echo", "webhook": {"url": url}})
        body = assert_problem(r, 400)
        assert "webhook.url" in body["errors"], (url, body)
    assert client.get("/v1/tasks", headers=org.headers).get_json()["data"] == []


def test_failed_authentications_are_limited_per_address(
    client: FlaskClient, org: Org, app, monkeypatch
) -> None:
    import app.api.plumbing as requests_module

    # One fixed instant: the counting window cannot roll over mid-test.
    monkeypatch.setattr(requests_module.time, "time", lambda: 1_800_000_030.0)
    limit = app.extensions["waybill"].settings.auth_failures_per_minute
    for _ in range(limit):
        assert client.get("/v1/tasks", headers={"Authorization": "Bearer wb_bad_guess"}).status_code == 401
    r = client.get("/v1/tasks", headers={"Authorization": "Bearer wb_bad_guess"})
    body = assert_problem(r, 429)
    assert body["type"].endswith("too-many-authentication-failures")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    # The address's unauthenticated requests are refused; a valid key from
    # the same address (one NAT, many tenants) is never locked out by them.
    assert client.get("/v1/tasks").status_code == 429
    assert client.get("/v1/tasks", headers=org.headers).status_code == 200
    other = client.get(
        "/v1/tasks",
        headers={"Authorization": "Bearer wb_bad_guess"},
        environ_base={"REMOTE_ADDR": "10.9.8.7"},
    )
    assert other.status_code == 401
