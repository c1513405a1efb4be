"""A client generated from the served /openapi.json is typed, and parses the server's real bodies.

openapi-python-client generates the package offline (no project metadata,
no post hooks, warnings fatal) into a temporary directory. Its functions then
call the real app through httpx's WSGI transport: every body they parse is
one the server really sent.
"""

from __future__ import annotations

import datetime
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import fakeredis
import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app import create_app
from app.api.openapi import build_spec
from app.db import Database
from app.models import WebhookDelivery
from app.services.task_types import Registry
from app.usecases import run
from config import Settings
from tests.conftest import RecordingPublisher
from tests.support import make_org

PACKAGE = "waybill_generated_client"
HOOK = "http://127.0.0.1:9/hook"  # never called: the publisher only records


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("client")
    document = root / "openapi.json"
    document.write_text(json.dumps(build_spec()))
    config = root / "config.yaml"
    config.write_text("post_hooks: []\n")  # the default hooks run ruff from PATH
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(document),
            "--meta",
            "none",
            "--output-path",
            str(root / PACKAGE),
            "--config",
            str(config),
            # A construct the generator cannot type is a warning: fail on it.
            "--fail-on-warning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(root))
    try:
        yield SimpleNamespace(
            client=importlib.import_module(PACKAGE),
            models=importlib.import_module(f"{PACKAGE}.models"),
            submit_task=importlib.import_module(f"{PACKAGE}.api.default.submit_task"),
            get_task=importlib.import_module(f"{PACKAGE}.api.default.get_task"),
            submit_task_batch=importlib.import_module(f"{PACKAGE}.api.default.submit_task_batch"),
        )
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


@pytest.fixture
def app(
    settings: Settings, db: Database, publisher: RecordingPublisher, fake_redis: fakeredis.FakeRedis
) -> Flask:
    # HOOK is a literal loopback address: allowed, so submissions need no DNS.
    return create_app(
        settings.with_overrides(webhook_allow_private=True),
        db=db,
        publisher=publisher,
        redis_client=fake_redis,
    )


def _api(generated: SimpleNamespace, app: Flask, key: str) -> Any:
    return generated.client.AuthenticatedClient(
        base_url="http://waybill.test",
        token=key,
        httpx_args={"transport": httpx.WSGITransport(app=app)},
        raise_on_unexpected_status=True,
    )


def test_the_client_is_generated_from_the_served_document(client: FlaskClient) -> None:
    assert client.get("/openapi.json").get_json() == json.loads(json.dumps(build_spec()))


def test_a_submission_is_typed_by_its_task_type(generated: SimpleNamespace, app: Flask, db: Database) -> None:
    m = generated.models
    api = _api(generated, app, make_org(db).api_key)
    body = m.SubmitSleepTask(
        type_=m.SubmitSleepTaskType.SLEEP, input_=m.SleepInput(seconds=0.5), webhook=m.Webhook(url=HOOK)
    )
    r = generated.submit_task.sync_detailed(client=api, body=body)
    assert r.status_code == 202
    task = r.parsed
    assert isinstance(task, m.Task)
    assert task.status is m.TaskStatus.QUEUED
    assert isinstance(task.webhook, m.TaskWebhook) and task.webhook.url == HOOK
    assert task.input_ == {"seconds": 0.5}
    # Each type's input is its own model: the fetch input knows its fields and their enums.
    fetch = m.HttpFetchInput(url="https://example.com/", method=m.HttpFetchInputMethod.HEAD)
    echo = m.SubmitEchoTask(type_=m.SubmitEchoTaskType.ECHO, input_=[1, {"any": "json"}])
    for other in (m.SubmitHttpFetchTask(type_=m.SubmitHttpFetchTaskType.HTTP_FETCH, input_=fetch), echo):
        done = generated.submit_task.sync_detailed(client=api, body=other)
        assert done.status_code == 202, done.content
        assert done.parsed.webhook is None


def test_a_failed_task_and_its_webhook_payload_parse_as_typed_models(
    generated: SimpleNamespace, app: Flask, db: Database
) -> None:
    m = generated.models
    api = _api(generated, app, make_org(db).api_key)
    # Loopback is refused to the task itself (allow_private_targets=False): it fails.
    body = m.SubmitHttpFetchTask(
        type_=m.SubmitHttpFetchTaskType.HTTP_FETCH,
        input_=m.HttpFetchInput(url="http://127.0.0.1:9/"),
        webhook=m.Webhook(url=HOOK),
        metadata=m.SubmitHttpFetchTaskMetadataType0.from_dict({"order": 7}),
    )
    task_id = generated.submit_task.sync(client=api, body=body).task_id
    settings = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)
    assert run.execute(db, Registry.from_entry_points(), settings, task_id).status == "failed"

    task = generated.get_task.sync(client=api, task_id=task_id)
    assert isinstance(task, m.Task) and task.status is m.TaskStatus.FAILED
    assert isinstance(task.error, m.ErrorDetail) and task.error.code == "target_refused"
    assert isinstance(task.error.message, str)
    assert isinstance(task.webhook, m.TaskWebhook)
    assert isinstance(task.webhook.url, str) and task.webhook.status is m.TaskWebhookStatus.PENDING
    assert isinstance(task.created_at, datetime.datetime) and task.metadata["order"] == 7

    with db.session() as s:
        payload = s.execute(
            select(WebhookDelivery.payload).where(WebhookDelivery.task_id == task_id)
        ).scalar_one()
    assert payload["type"] == "task.failed"
    delivered = m.Task.from_dict(payload["data"])
    assert isinstance(delivered.webhook, m.TaskWebhook) and delivered.webhook.url == HOOK
    assert isinstance(delivered.error, m.ErrorDetail) and delivered.error.code == "target_refused"
    # The model holds every member the server sent (it would drop an undeclared
    # one); its datetimes come back in another spelling of the same instant.
    assert delivered.to_dict().keys() == payload["data"].keys()
    assert delivered.completed_at == datetime.datetime.fromisoformat(payload["data"]["completedAt"])


def test_problems_parse_with_their_members(generated: SimpleNamespace, app: Flask, db: Database) -> None:
    m = generated.models
    sleep = m.SubmitSleepTaskType.SLEEP

    bad = generated.submit_task.sync_detailed(
        client=_api(generated, app, make_org(db, "bad").api_key),
        body=m.SubmitSleepTask(type_=sleep, input_=m.SleepInput(seconds=301)),
    )
    assert bad.status_code == 400 and isinstance(bad.parsed, m.Problem)
    assert isinstance(bad.parsed.errors, m.ProblemErrors)
    assert list(bad.parsed.errors.additional_properties) == ["input.seconds"]
    assert all(isinstance(message, str) for message in bad.parsed.errors["input.seconds"])

    poor = generated.submit_task.sync_detailed(
        client=_api(generated, app, make_org(db, "poor", credits=0).api_key),
        body=m.SubmitSleepTask(type_=sleep, input_=m.SleepInput(seconds=1)),
    )
    assert poor.status_code == 402 and isinstance(poor.parsed, m.Problem)
    assert (poor.parsed.balance, poor.parsed.cost) == (0, 1)

    small = _api(generated, app, make_org(db, "small", queue_limit=1).api_key)
    echo = m.SubmitEchoTask(type_=m.SubmitEchoTaskType.ECHO)
    assert generated.submit_task.sync_detailed(client=small, body=echo).status_code == 202
    full = generated.submit_task.sync_detailed(client=small, body=echo)
    assert full.status_code == 429 and isinstance(full.parsed, m.Problem)
    assert (full.parsed.queued, full.parsed.queue_limit) == (1, 1)
    assert int(full.headers["Retry-After"]) >= 1

    api = _api(generated, app, make_org(db, "keys").api_key)
    first = m.SubmitEchoTask(type_=m.SubmitEchoTaskType.ECHO, input_=1, idempotency_key="order-9")
    assert generated.submit_task.sync_detailed(client=api, body=first).status_code == 202
    second = m.SubmitEchoTask(type_=m.SubmitEchoTaskType.ECHO, input_=2, idempotency_key="order-9")
    reused = generated.submit_task.sync_detailed(client=api, body=second)
    assert reused.status_code == 422 and reused.parsed.idempotency_key == "order-9"


def test_a_batch_answer_parses_as_typed_entries(generated: SimpleNamespace, app: Flask, db: Database) -> None:
    m = generated.models
    api = _api(generated, app, make_org(db, "batch", credits=2, queue_limit=2).api_key)
    echo = m.SubmitEchoTaskType.ECHO
    keyed = m.SubmitEchoTask(type_=echo, input_=1, idempotency_key="b-1")
    body = m.SubmitTaskBatch(
        tasks=[
            m.SubmitSleepTask(
                type_=m.SubmitSleepTaskType.SLEEP, input_=m.SleepInput(seconds=1), webhook=m.Webhook(url=HOOK)
            ),
            keyed,
            m.SubmitEchoTask(type_=echo, input_=2, idempotency_key="b-1"),  # 422
            keyed,  # a replay of the second
            m.SubmitHttpFetchTask(
                type_=m.SubmitHttpFetchTaskType.HTTP_FETCH,
                input_=m.HttpFetchInput(url="https://example.com/"),
            ),  # no credits left: 402
        ]
    )
    r = generated.submit_task_batch.sync_detailed(client=api, body=body)
    assert r.status_code == 200 and isinstance(r.parsed, m.TaskBatchResult)
    first, second, conflict, replay, poor = r.parsed.data
    for entry in (first, second, replay):
        assert isinstance(entry, m.BatchTaskEntry) and isinstance(entry.task, m.Task)
    assert first.status is m.BatchTaskEntryStatus.VALUE_202 and first.task.status is m.TaskStatus.QUEUED
    assert isinstance(first.task.webhook, m.TaskWebhook) and first.task.webhook.url == HOOK
    assert replay.status is m.BatchTaskEntryStatus.VALUE_200 and replay.task.task_id == second.task.task_id
    for entry in (conflict, poor):
        assert isinstance(entry, m.BatchProblemEntry) and isinstance(entry.problem, m.Problem)
    assert conflict.status is m.BatchProblemEntryStatus.VALUE_422
    assert conflict.problem.idempotency_key == "b-1"
    assert poor.status is m.BatchProblemEntryStatus.VALUE_402
    assert (poor.problem.balance, poor.problem.cost) == (0, 2)

    too_many = generated.submit_task_batch.sync_detailed(
        client=api, body=m.SubmitTaskBatch(tasks=[keyed] * 1001)
    )
    assert too_many.status_code == 400 and isinstance(too_many.parsed, m.Problem)
    assert list(too_many.parsed.errors.additional_properties) == ["tasks"]
