"""Real responses of every operation, errors included, validate against the served /openapi.json.

openapi-core checks each response (status, content type, required headers,
body) against the document the app serves. Every (method, path, status) the
document declares is produced here by a real request, and nothing else is:
a declared response the server never sends, or a sent one the document does
not declare, fails.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_core import Config, OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse
from openapi_core.exceptions import OpenAPIError
from werkzeug.test import EnvironBuilder, TestResponse
from werkzeug.wrappers import Request, Response

import app.api.plumbing as requests_module
from app import create_app
from app.api import events as events_api
from app.db import Database
from app.services.task_types import Registry
from app.usecases import run
from config import Settings
from tests.conftest import RecordingPublisher
from tests.support import make_org

METRICS_TOKEN = "metrics-secret"
HOOK = "http://127.0.0.1:9/hook"  # never called: the publisher only records
LIMITED_ADDRESS = "198.51.100.23"  # the address that exhausts the failed-authentication limit
RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)


@pytest.fixture
def app(
    settings: Settings, db: Database, publisher: RecordingPublisher, fake_redis: fakeredis.FakeRedis
) -> Flask:
    # Private webhook targets allowed: HOOK is a literal loopback address, so
    # submissions need no DNS; a metrics token, so /metrics can answer 401.
    return create_app(
        settings.with_overrides(
            webhook_allow_private=True, metrics_token=METRICS_TOKEN, auth_failures_per_minute=2
        ),
        db=db,
        publisher=publisher,
        redis_client=fake_redis,
    )


@pytest.fixture
def frozen_minute(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # One fixed instant: the limiter's one-minute window cannot roll over mid-test.
    monkeypatch.setattr(requests_module.time, "time", lambda: 1_800_000_030.0)
    yield
    # The process-wide set of blocked addresses outlives the app; leave it as found.
    with requests_module._blocked_lock:
        requests_module._blocked.difference_update(
            {b for b in requests_module._blocked if b[0] == LIMITED_ADDRESS}
        )


@dataclass
class Contract:
    client: FlaskClient
    document: dict[str, Any]
    openapi: OpenAPI
    seen: set[tuple[str, str, str]] = field(default_factory=set)

    def declared(self) -> set[tuple[str, str, str]]:
        return {
            (method, path, status)
            for path, operations in self.document["paths"].items()
            for method, operation in operations.items()
            for status in operation["responses"]
        }

    def call(
        self,
        method: str,
        template: str,
        expect: int,
        *,
        path: dict[str, str] | None = None,
        request_valid: bool = True,
        **kwargs: Any,
    ) -> TestResponse:
        """One request through the app; its response must have status ``expect`` and match the document.

        ``request_valid=False``: a batch with invalid items, which the server
        answers 200 (each item its own entry) and the document does not accept.
        """
        url = template.format(**(path or {}))
        response = self.client.open(url, method=method.upper(), **kwargs)
        assert response.status_code == expect, (method, url, response.get_data(as_text=True))
        request = self.request(method, url, **kwargs)
        self.openapi.validate_response(request, WerkzeugOpenAPIResponse(response))
        if response.mimetype == "application/problem+json":
            # additionalProperties is true for problems (RFC 9457), so the
            # validator would pass an undeclared member: name them all.
            members = set(self.document["components"]["schemas"]["Problem"]["properties"])
            assert set(response.get_json()) <= members, response.get_json()
        if 200 <= expect < 300 and request_valid:
            # What the server accepts, the document accepts too.
            self.openapi.validate_request(request)
        elif not request_valid:
            with pytest.raises(OpenAPIError):
                self.openapi.validate_request(request)
        self.seen.add((method.lower(), template, str(expect)))
        return response

    @staticmethod
    def request(method: str, url: str, **kwargs: Any) -> WerkzeugOpenAPIRequest:
        # A second request built from the same arguments: the app consumed
        # the first one's body, and openapi-core reads the body again.
        return WerkzeugOpenAPIRequest(
            Request(EnvironBuilder(url, method=method.upper(), **kwargs).get_environ())
        )


@pytest.fixture
def contract(client: FlaskClient) -> Contract:
    document = client.get("/openapi.json").get_json()
    # openapi-core parses only application/json (and vnd.api+json) as JSON by default.
    # An event stream is text (its events are parsed in test_progress_events.py).
    config = Config(
        extra_media_type_deserializers={
            "application/problem+json": json.loads,
            "text/event-stream": lambda data: data.decode() if isinstance(data, bytes) else data,
        }
    )
    return Contract(client, document, OpenAPI.from_dict(copy.deepcopy(document), config=config))


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _submissions(c: Contract, db: Database) -> None:
    key = make_org(db, "submitter").api_key
    first = {
        "type": "echo",
        "input": {"hello": "world"},
        "webhook": {"url": HOOK},
        "idempotencyKey": "order-1",
        "metadata": {"m": 1},
    }
    task = c.call("post", "/v1/tasks", 202, json=first, headers=_auth(key)).get_json()
    assert task["webhook"]["url"] == HOOK
    replay = c.call("post", "/v1/tasks", 200, json=first, headers=_auth(key))
    assert replay.headers["Idempotent-Replayed"] == "true"
    for body in (
        {"type": "sleep", "input": {"seconds": 0.5}},
        {"type": "http.fetch", "input": {"url": "https://example.com/"}, "webhook": None},
        {"type": "echo"},
    ):
        c.call("post", "/v1/tasks", 202, json=body, headers=_auth(key))
    conflict = c.call("post", "/v1/tasks", 422, json={**first, "input": {"other": 1}}, headers=_auth(key))
    assert conflict.get_json()["idempotencyKey"] == "order-1"
    bad = c.call(
        "post", "/v1/tasks", 400, json={"type": "sleep", "input": {"seconds": 301}}, headers=_auth(key)
    )
    assert list(bad.get_json()["errors"]) == ["input.seconds"]
    c.call("post", "/v1/tasks", 400, json={"type": "echo", "webhook": {"foo": 1}}, headers=_auth(key))
    raw = json.dumps({"type": "echo", "input": "x" * 1_100_000})
    c.call("post", "/v1/tasks", 413, data=raw, content_type="application/json", headers=_auth(key))
    c.call("post", "/v1/tasks", 415, data="type=echo", content_type="text/plain", headers=_auth(key))

    poor = make_org(db, "poor", credits=0).api_key
    broke = c.call("post", "/v1/tasks", 402, json={"type": "echo"}, headers=_auth(poor)).get_json()
    assert (broke["balance"], broke["cost"]) == (0, 1)

    small = make_org(db, "small", queue_limit=1).api_key
    c.call("post", "/v1/tasks", 202, json={"type": "echo"}, headers=_auth(small))
    full = c.call("post", "/v1/tasks", 429, json={"type": "echo"}, headers=_auth(small)).get_json()
    assert (full["queued"], full["queueLimit"]) == (1, 1)


def _batches(c: Contract, db: Database) -> None:
    """``POST /v1/tasks/batch``: every kind of entry in one answer, and the batch's own refusals."""
    key = make_org(db, "batcher", credits=4, queue_limit=4).api_key
    stored = {"type": "echo", "input": 1, "idempotencyKey": "stored"}
    c.call("post", "/v1/tasks", 202, json=stored, headers=_auth(key))
    valid = [
        {"type": "sleep", "input": {"seconds": 0.5}, "webhook": {"url": HOOK}, "metadata": {"m": 1}},
        {"type": "echo", "idempotencyKey": "new"},
        {"type": "echo", "idempotencyKey": "new"},
        stored,
    ]
    data = c.call("post", "/v1/tasks/batch", 200, json={"tasks": valid}, headers=_auth(key)).get_json()[
        "data"
    ]
    assert [e["status"] for e in data] == [202, 202, 200, 200]
    mixed = [
        {"type": "http.fetch", "input": {"url": "https://example.com/"}},  # cost 2, 1 credit left: 402
        {**stored, "input": 2},  # 422
        {"type": "sleep", "input": {"seconds": 301}},  # 400
        "not a submission",  # 400
        {"type": "echo"},  # the last credit and queue place
        {"type": "echo", "input": "\u0000"},  # 400
    ]
    data = c.call(
        "post", "/v1/tasks/batch", 200, json={"tasks": mixed}, headers=_auth(key), request_valid=False
    ).get_json()["data"]
    assert [e["status"] for e in data] == [402, 422, 400, 400, 202, 400]
    full = make_org(db, "batch-full", queue_limit=0).api_key
    data = c.call("post", "/v1/tasks/batch", 200, json={"tasks": [{"type": "echo"}]}, headers=_auth(full))
    assert [e["status"] for e in data.get_json()["data"]] == [429]
    members = set(c.document["components"]["schemas"]["Problem"]["properties"])
    assert all(set(e["problem"]) <= members for e in data.get_json()["data"])
    refused: list[dict[str, Any]] = [
        {"tasks": []},
        {"tasks": [{"type": "echo"}] * 1001},
        {"task": [{"type": "echo"}]},
    ]
    for body in refused:
        c.call("post", "/v1/tasks/batch", 400, json=body, headers=_auth(key))
    c.call(
        "post",
        "/v1/tasks/batch",
        400,
        json={"tasks": [{"type": "echo"}]},
        headers={**_auth(key), "Idempotency-Key": "k"},
    )
    raw = json.dumps({"tasks": [{"type": "echo", "input": "x" * 1_100_000}]})
    c.call("post", "/v1/tasks/batch", 413, data=raw, content_type="application/json", headers=_auth(key))
    c.call("post", "/v1/tasks/batch", 415, data="tasks", content_type="text/plain", headers=_auth(key))


def _tasks(c: Contract, db: Database) -> None:
    key = make_org(db, "reader").api_key
    ids = {}
    for name, body in (
        ("succeeds", {"type": "echo", "input": [1, "two"], "webhook": {"url": HOOK}}),
        # Loopback is refused to the task (allow_private_targets=False): it fails with an error.
        ("fails", {"type": "http.fetch", "input": {"url": "http://127.0.0.1:9/"}, "webhook": {"url": HOOK}}),
        ("canceled", {"type": "sleep", "input": {"seconds": 1}, "webhook": {"url": HOOK}}),
        ("quiet", {"type": "echo"}),
    ):
        ids[name] = c.call("post", "/v1/tasks", 202, json=body, headers=_auth(key)).get_json()["taskId"]
    registry = Registry.from_entry_points()
    assert run.execute(db, registry, RUN, ids["succeeds"]).status == "succeeded"
    assert run.execute(db, registry, RUN, ids["fails"]).status == "failed"

    one = "/v1/tasks/{taskId}"
    done = c.call("get", one, 200, path={"taskId": ids["succeeds"]}, headers=_auth(key)).get_json()
    assert done["result"] == [1, "two"]
    failed = c.call("get", one, 200, path={"taskId": ids["fails"]}, headers=_auth(key)).get_json()
    assert failed["error"]["code"] == "target_refused"
    c.call("get", one, 404, path={"taskId": "tsk_unknown"}, headers=_auth(key))

    cancel = "/v1/tasks/{taskId}/cancel"
    canceled = c.call("post", cancel, 200, path={"taskId": ids["canceled"]}, headers=_auth(key)).get_json()
    assert canceled["status"] == "canceled"
    c.call("post", cancel, 409, path={"taskId": ids["canceled"]}, headers=_auth(key))
    c.call("post", cancel, 404, path={"taskId": "tsk_unknown"}, headers=_auth(key))

    listed = c.call("get", "/v1/tasks", 200, query_string={"limit": 2}, headers=_auth(key)).get_json()
    assert len(listed["data"]) == 2 and listed["nextCursor"]
    rest = {"limit": 100, "cursor": listed["nextCursor"], "status": "failed", "type": "http.fetch"}
    c.call("get", "/v1/tasks", 200, query_string=rest, headers=_auth(key))
    for bad in ({"limit": 0}, {"limit": 101}, {"cursor": "c" * 201}, {"type": "t" * 101}, {"status": "lost"}):
        c.call("get", "/v1/tasks", 400, query_string=bad, headers=_auth(key))

    events = "/v1/tasks/{taskId}/events"
    stream = c.call("get", events, 200, path={"taskId": ids["succeeds"]}, headers=_auth(key))
    assert stream.mimetype == "text/event-stream" and b"event: task.succeeded" in stream.data
    c.call("get", events, 404, path={"taskId": "tsk_unknown"}, headers=_auth(key))
    wb = c.client.application.extensions["waybill"]
    events_api._slots[id(wb)] = events_api.StreamSlots(0)  # every stream slot taken
    try:
        busy = c.call("get", events, 503, path={"taskId": ids["succeeds"]}, headers=_auth(key))
        assert busy.headers["Retry-After"] == "5"
    finally:
        events_api._slots.pop(id(wb), None)

    deliveries = "/v1/tasks/{taskId}/deliveries"
    log = c.call("get", deliveries, 200, path={"taskId": ids["succeeds"]}, headers=_auth(key)).get_json()
    assert len(log["data"]) == 1
    assert log["data"][0]["event"] == log["data"][0]["eventType"] == "task.succeeded"
    c.call("get", deliveries, 404, path={"taskId": "tsk_unknown"}, headers=_auth(key))
    c.call("post", deliveries, 202, path={"taskId": ids["canceled"]}, headers=_auth(key))
    c.call("post", deliveries, 409, path={"taskId": ids["quiet"]}, headers=_auth(key))
    c.call("post", deliveries, 404, path={"taskId": "tsk_unknown"}, headers=_auth(key))


def _organization(c: Contract, db: Database) -> None:
    key = make_org(db, "owner").api_key
    bulk = "/v1/deliveries/redeliver"
    counted = c.call(
        "post", bulk, 202, json={"since": "2026-01-01T00:00:00Z", "host": "x"}, headers=_auth(key)
    )
    assert counted.get_json() == {"count": 0}
    c.call("post", bulk, 400, json={"since": "2026-01-01T00:00:00"}, headers=_auth(key))
    raw = json.dumps({"since": "2026-01-01T00:00:00Z", "host": "x" * 1_100_000})
    c.call("post", bulk, 413, data=raw, content_type="application/json", headers=_auth(key))
    c.call("post", bulk, 415, data="since=1", content_type="text/plain", headers=_auth(key))
    for path in ("/v1/organization", "/v1/task-types", "/v1/webhook-secret"):
        c.call("get", path, 200, headers=_auth(key))
    c.call("post", "/v1/webhook-secret/rotate", 200, headers=_auth(key))


def _every_v1_operation_refuses(c: Contract, db: Database) -> None:
    """400 (U+0000 in the query), 401 and the limiter's 429, on every /v1 operation of the document."""
    key = make_org(db, "refused").api_key
    operations = [
        (method, path)
        for path, methods in c.document["paths"].items()
        if path.startswith("/v1/")
        for method in methods
    ]
    assert len(operations) >= 10
    nowhere = {"taskId": "tsk_unknown"}
    for i, (method, path) in enumerate(operations):
        nul = c.call(method, path, 400, path=nowhere, query_string={"q": "a\x00b"}, headers=_auth(key))
        assert list(nul.get_json()["errors"]) == ["q"]
        # Two failures per address, so that none goes over the limit (2) here.
        own = {"REMOTE_ADDR": f"192.0.2.{i + 1}"}
        c.call(method, path, 401, path=nowhere, environ_base=own)
        c.call(method, path, 401, path=nowhere, headers=_auth("wb_wrong_guess"), environ_base=own)
    address = {"REMOTE_ADDR": LIMITED_ADDRESS}
    for _ in range(2):  # the limit (auth_failures_per_minute=2); the next failure is over it
        c.call("get", "/v1/organization", 401, environ_base=address)
    for method, path in operations:
        limited = c.call(method, path, 429, path=nowhere, environ_base=address)
        assert 1 <= int(limited.headers["Retry-After"]) <= 60


def _operations(c: Contract, fake_server: fakeredis.FakeServer) -> None:
    c.call("get", "/healthz", 200)
    c.call("get", "/readyz", 200)
    metrics = c.call("get", "/metrics", 200, headers=_auth(METRICS_TOKEN))
    assert b"waybill_" in metrics.data
    c.call("get", "/metrics", 401)
    c.call("get", "/metrics", 401, headers=_auth("wrong"))
    fake_server.connected = False  # the broker goes away
    c.call("get", "/readyz", 503)


@pytest.mark.usefixtures("frozen_minute")
def test_every_declared_response_is_real_and_matches_the_document(
    contract: Contract, db: Database, fake_server: fakeredis.FakeServer
) -> None:
    _submissions(contract, db)
    _batches(contract, db)
    _tasks(contract, db)
    _organization(contract, db)
    _every_v1_operation_refuses(contract, db)
    _operations(contract, fake_server)
    assert contract.seen == contract.declared(), {
        "declared, never produced": sorted(contract.declared() - contract.seen),
        "produced, not declared": sorted(contract.seen - contract.declared()),
    }


def test_the_validation_catches_what_the_document_does_not_describe(contract: Contract, db: Database) -> None:
    """A self-check: the validation above does fail on undescribed responses."""
    key = make_org(db, "poor", credits=0).api_key
    real = contract.client.post("/v1/tasks", json={"type": "echo"}, headers=_auth(key))
    assert real.status_code == 402
    request = Contract.request("post", "/v1/tasks", json={"type": "echo"})
    contract.openapi.validate_response(request, WerkzeugOpenAPIResponse(real))

    def response(body: Any, status: int = 402) -> WerkzeugOpenAPIResponse:
        return WerkzeugOpenAPIResponse(Response(json.dumps(body), status=status, headers=dict(real.headers)))

    problem = real.get_json()
    with pytest.raises(OpenAPIError):  # an undeclared status
        contract.openapi.validate_response(request, response(problem, 418))
    with pytest.raises(OpenAPIError):  # a Problem without one of its required members
        contract.openapi.validate_response(
            request, response({k: v for k, v in problem.items() if k != "detail"})
        )
    with pytest.raises(OpenAPIError):  # a declared member of the wrong type
        contract.openapi.validate_response(request, response({**problem, "balance": "zero"}))

    # A task with a member the document does not declare.
    task = contract.client.get("/v1/tasks", headers=_auth(make_org(db, "rich").api_key)).get_json()
    listing = Contract.request("get", "/v1/tasks")
    ok = Response(json.dumps(task), status=200, mimetype="application/json")
    contract.openapi.validate_response(listing, WerkzeugOpenAPIResponse(ok))
    task["surprise"] = 1
    with pytest.raises(OpenAPIError):
        contract.openapi.validate_response(
            listing,
            WerkzeugOpenAPIResponse(Response(json.dumps(task), status=200, mimetype="application/json")),
        )


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"type": "sleep", "input": {"seconds": 1}, "webhook": {"url": HOOK}}, True),
        ({"type": "echo", "input": None, "webhook": None}, True),
        ({"type": "http.fetch", "input": {"url": "https://example.com/", "method": "HEAD"}}, True),
        # The audit's case: a webhook object that is not a Webhook.
        ({"type": "echo", "webhook": {"foo": 1}}, False),
        ({"type": "sleep", "input": {"seconds": "x"}}, False),
        ({"type": "sleep"}, False),
        ({"type": "http.fetch", "input": {"url": "https://example.com/", "method": "POST"}}, False),
        ({"type": "echo", "idempotencyKey": ""}, False),
        ({"type": "no-such-type"}, False),
    ],
)
def test_the_document_accepts_a_submission_exactly_when_the_server_does(
    contract: Contract, db: Database, body: dict[str, Any], valid: bool
) -> None:
    key = make_org(db).api_key
    served = contract.client.post("/v1/tasks", json=body, headers=_auth(key))
    assert served.status_code == (202 if valid else 400), served.get_json()
    request = Contract.request("post", "/v1/tasks", json=body, headers=_auth(key))
    if valid:
        contract.openapi.validate_request(request)
    else:
        with pytest.raises(OpenAPIError):
            contract.openapi.validate_request(request)


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"type": "sleep", "input": {"seconds": 1}, "webhook": {"url": HOOK}}, True),
        ({"type": "echo", "input": None, "webhook": None, "idempotencyKey": "k"}, True),
        ({"type": "echo", "webhook": {"foo": 1}}, False),
        ({"type": "sleep", "input": {"seconds": "x"}}, False),
        ({"type": "http.fetch", "input": {"url": "https://example.com/", "method": "POST"}}, False),
        ({"type": "no-such-type"}, False),
    ],
)
def test_the_document_accepts_a_batch_item_exactly_when_the_server_accepts_it(
    contract: Contract, db: Database, body: dict[str, Any], valid: bool
) -> None:
    key = make_org(db).api_key
    served = contract.client.post("/v1/tasks/batch", json={"tasks": [body]}, headers=_auth(key))
    assert served.status_code == 200
    assert served.get_json()["data"][0]["status"] == (202 if valid else 400)
    request = Contract.request("post", "/v1/tasks/batch", json={"tasks": [body]}, headers=_auth(key))
    if valid:
        contract.openapi.validate_request(request)
    else:
        with pytest.raises(OpenAPIError):
            contract.openapi.validate_request(request)


@pytest.mark.parametrize(
    "body",
    [{}, {"tasks": []}, {"tasks": [{"type": "echo"}] * 1001}, {"tasks": [{"type": "echo"}], "more": 1}, []],
)
def test_the_document_refuses_the_batches_the_server_refuses(
    contract: Contract, db: Database, body: Any
) -> None:
    key = make_org(db).api_key
    assert contract.client.post("/v1/tasks/batch", json=body, headers=_auth(key)).status_code == 400
    with pytest.raises(OpenAPIError):
        contract.openapi.validate_request(Contract.request("post", "/v1/tasks/batch", json=body))


def test_a_batch_entry_that_is_neither_kind_does_not_validate(contract: Contract, db: Database) -> None:
    """A self-check of the union: each entry is a task with 200 or 202, or a problem with a 4xx."""
    key = make_org(db).api_key
    real = contract.client.post("/v1/tasks/batch", json={"tasks": [{"type": "echo"}]}, headers=_auth(key))
    request = Contract.request("post", "/v1/tasks/batch", json={"tasks": [{"type": "echo"}]})
    contract.openapi.validate_response(request, WerkzeugOpenAPIResponse(real))
    entry = real.get_json()["data"][0]
    problem = {"type": "t", "title": "t", "status": 402, "detail": "d"}
    for wrong in (
        {**entry, "status": 201},
        {"status": 402, "task": entry["task"]},
        {"status": 202, "problem": problem},
        {"status": 402, "problem": problem, "task": entry["task"]},
        {"status": 202},
    ):
        body = json.dumps({"data": [wrong]})
        with pytest.raises(OpenAPIError):
            contract.openapi.validate_response(
                request, WerkzeugOpenAPIResponse(Response(body, status=200, mimetype="application/json"))
            )
