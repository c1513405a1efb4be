"""The operator console (``/console/``): credentials, CSRF, every page, every action and its audit record."""

from __future__ import annotations

import base64
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from app import cli, create_app
from app.console import auth, refusal, views, workers
from app.db import Database
from app.models import ApiKey, AuditRecord, CreditEntry, Organization, Task, WebhookDelivery
from app.models.base import utcnow
from app.services import deliveries, submission
from app.services.task_types import Registry
from app.usecases import run
from config import Settings
from tests.conftest import RecordingPublisher
from tests.support import Org, make_org

USER, PASSWORD = "ops", "pa:ss w0rd"  # a colon and a space in the password: split at the first colon only
CREDENTIALS = f"{USER}:{PASSWORD}"
HOST = "localhost"  # the test client's Host
REG = Registry.from_entry_points()
RUN = run.RunSettings(lease_seconds=30, max_attempts=3, allow_private_targets=False)
HOSTILE = "<script>alert('x')</script>&"
SEEN = workers.seen  # the real one: no_worker_ping below replaces it for the pages


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


AUTH = basic(USER, PASSWORD)


@pytest.fixture(autouse=True)
def no_worker_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    # No broker in unit tests; workers.seen itself is tested below with a fake Celery.
    monkeypatch.setattr(views.workers, "seen", lambda celery: workers.WorkersSeen(["tasks@h1"], True))


@pytest.fixture
def console_app(
    settings: Settings, db: Database, publisher: RecordingPublisher, fake_redis: fakeredis.FakeRedis
) -> Flask:
    return create_app(
        settings.with_overrides(console_basic_auth=CREDENTIALS),
        db=db,
        publisher=publisher,
        redis_client=fake_redis,
    )


@dataclass
class Console:
    client: FlaskClient

    def get(self, path: str, **kwargs: Any) -> TestResponse:
        return self.client.get(path, headers=AUTH, **kwargs)

    def token(self, path: str = "/console/deliveries") -> str:
        """The token a page's forms carry, as a browser would post it."""
        page = html(self.get(path))
        tokens = set(re.findall(r'name="csrf_token" value="([^"]*)"', page))
        assert len(tokens) == 1 and "" not in tokens, tokens
        return tokens.pop()

    def post(
        self, path: str, data: dict[str, str] | None = None, *, token: str | None = "page", **headers: str
    ) -> TestResponse:
        form = dict(data or {})
        if token == "page":
            form["csrf_token"] = self.token()
        elif token is not None:
            form["csrf_token"] = token
        return self.client.post(
            path, data=form, headers={**AUTH, "Origin": f"http://{HOST}", **headers}, follow_redirects=False
        )


@pytest.fixture
def console(console_app: Flask) -> Console:
    return Console(console_app.test_client())


def html(response: TestResponse) -> str:
    return response.get_data(as_text=True)


def audits(db: Database, org_id: str | None = None) -> list[AuditRecord]:
    with db.session() as s:
        query = select(AuditRecord).order_by(AuditRecord.id)
        if org_id is not None:
            query = query.where(AuditRecord.organization_id == org_id)
        return list(s.execute(query).scalars())


def org_row(db: Database, org_id: str) -> Organization:
    with db.session() as s:
        org = s.get(Organization, org_id)
        assert org is not None
        return org


def submit(db: Database, org: Org, **fields: Any) -> str:
    fields.setdefault("input", {"v": 1})
    with db.session() as s:
        return submission.submit(
            s, org.id, submission.SubmitRequest(type="echo", **fields), registry=REG
        ).task.id


def finished_with_failed_webhook(
    db: Database, org: Org, url: str = "https://hooks.example/x"
) -> tuple[str, str]:
    """A succeeded task whose result's delivery failed (the receiver answered 410)."""
    task_id = submit(db, org, webhook_url=url)
    outcome = run.execute(db, REG, RUN, task_id)
    assert outcome.delivery_id is not None
    with db.session() as s:
        plan = deliveries.claim_attempt(s, outcome.delivery_id, hold_seconds=30)
    assert plan is not None
    with db.session() as s:
        deliveries.record_attempt(
            s, plan, deliveries.AttemptOutcome("gone", 410, 5, "http_410"), retry_base_seconds=120
        )
    return task_id, outcome.delivery_id


def delivery_status(db: Database, delivery_id: str) -> str:
    with db.session() as s:
        d = s.get(WebhookDelivery, delivery_id)
        assert d is not None
        return d.status


# 1. Credentials


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(USER, "wrong"),
        basic("someone", PASSWORD),
        basic(USER, PASSWORD + "x"),
        {"Authorization": f"Bearer {PASSWORD}"},
        {"Authorization": "Basic not-base64!"},
    ],
    ids=["none", "wrong-password", "wrong-user", "longer-password", "bearer", "garbage"],
)
def test_every_page_wants_the_operator_credentials(
    console_app: Flask, org: Org, headers: dict[str, str]
) -> None:
    client = console_app.test_client()
    for path in (
        "/console/",
        f"/console/organizations/{org.id}",
        "/console/tasks",
        "/console/static/console.css",
    ):
        response = client.get(path, headers=headers)
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"].startswith('Basic realm="Waybill console"')
        assert org.id not in html(response)
    # Nor can a POST act without them.
    response = client.post(f"/console/organizations/{org.id}/keys", headers=headers)
    assert response.status_code == 401
    with console_app.extensions["waybill"].db.session() as s:
        assert s.execute(select(func.count()).select_from(ApiKey)).scalar_one() == 1


def test_the_right_credentials_open_the_console(console: Console) -> None:
    response = console.get("/console/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert f'data-test="console-user">{USER}<' in html(response)
    assert response.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_refusal_outside_the_local_run_without_credentials(settings: Settings) -> None:
    problem = refusal(settings, {})
    assert problem is not None and "CONSOLE_BASIC_AUTH" in problem and "\n" not in problem
    assert refusal(settings, {cli.LOCAL_RUN_ENV: "1"}) is None
    assert refusal(settings.with_overrides(console_basic_auth="a:b"), {}) is None
    # Off is off: no console at all, so nothing to protect.
    assert refusal(settings.with_overrides(console_enabled=False), {}) is None
    # A malformed value is refused everywhere, the local run included.
    for bad in ("nocolon", ":password", "user:"):
        assert refusal(settings.with_overrides(console_basic_auth=bad), {cli.LOCAL_RUN_ENV: "1"}) is not None


@pytest.fixture
def serve_env(monkeypatch: pytest.MonkeyPatch, settings: Settings, db: Database) -> list[list[str]]:
    for name in ("CONSOLE_BASIC_AUTH", "CONSOLE_ENABLED", cli.LOCAL_RUN_ENV, "BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("VAR_DIR", settings.var_dir)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    started: list[list[str]] = []
    monkeypatch.setattr(cli.os, "execvp", lambda file, argv: started.append(list(argv)))
    return started


def test_waybill_serve_refuses_to_start_without_console_credentials(
    serve_env: list[list[str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("waybill: refusing to start") and "CONSOLE_BASIC_AUTH=user:password" in err
    assert serve_env == []  # gunicorn never started

    monkeypatch.setenv("CONSOLE_BASIC_AUTH", CREDENTIALS)
    assert cli.main(["serve"]) == 0
    assert serve_env and "app.wsgi:app" in serve_env[-1]
    assert not any(PASSWORD in arg for arg in serve_env[-1])


@pytest.mark.parametrize("env", [{cli.LOCAL_RUN_ENV: "1"}, {"CONSOLE_ENABLED": "false"}])
def test_waybill_serve_starts_in_the_local_run_or_with_the_console_off(
    serve_env: list[list[str]], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve"]) == 0
    assert len(serve_env) == 1


def test_without_credentials_the_console_is_closed_not_open(client: FlaskClient, org: Org) -> None:
    # The suite's app has no CONSOLE_BASIC_AUTH (gunicorn started on app.wsgi directly, not `waybill serve`).
    for headers in ({}, AUTH):
        response = client.get("/console/", headers=headers)
        assert response.status_code == 503
        assert "CONSOLE_BASIC_AUTH" in html(response) and org.id not in html(response)
        assert client.get(f"/console/organizations/{org.id}", headers=headers).status_code == 503


def test_the_console_turned_off_has_no_route(
    settings: Settings, db: Database, publisher: RecordingPublisher, fake_redis: fakeredis.FakeRedis, org: Org
) -> None:
    app = create_app(
        settings.with_overrides(console_enabled=False, console_basic_auth=CREDENTIALS),
        db=db,
        publisher=publisher,
        redis_client=fake_redis,
    )
    client = app.test_client()
    assert client.get("/console/", headers=AUTH).status_code == 404
    assert client.get(f"/console/organizations/{org.id}", headers=AUTH).status_code == 404
    assert not any(rule.rule.startswith("/console") for rule in app.url_map.iter_rules())


# 2. CSRF


@pytest.mark.parametrize(
    ("token", "headers"),
    [
        (None, {}),
        ("", {}),
        ("1700000000.deadbeef", {}),
        ("page", {"Origin": "https://evil.example"}),
        ("page", {"Origin": "null"}),
        ("page", {"Origin": "", "Referer": "https://evil.example/form"}),
    ],
    ids=["missing", "empty", "wrong", "foreign-origin", "null-origin", "foreign-referer"],
)
def test_a_form_without_the_consoles_token_or_from_elsewhere_is_refused(
    console: Console, db: Database, org: Org, token: str | None, headers: dict[str, str]
) -> None:
    if headers.get("Origin") == "":
        # No Origin at all: the Referer is checked instead.
        client = console.client
        response = client.post(
            f"/console/organizations/{org.id}/credits",
            data={"amount": "5", "csrf_token": console.token()},
            headers={**AUTH, "Referer": headers["Referer"]},
        )
    else:
        response = console.post(
            f"/console/organizations/{org.id}/credits", {"amount": "5"}, token=token, **headers
        )
    assert response.status_code == 403
    assert 'data-test="error"' in html(response)
    assert org_row(db, org.id).credits == 1000
    assert audits(db) == []


def test_a_token_of_another_password_or_too_old_is_refused(console: Console, db: Database, org: Org) -> None:
    other = auth.csrf_token(auth.Credentials(USER, "another password"), USER)
    stale = auth.csrf_token(
        auth.Credentials(USER, PASSWORD), USER, now=time.time() - auth.TOKEN_MAX_AGE_SECONDS - 60
    )
    for token in (other, stale):
        response = console.post(f"/console/organizations/{org.id}/credits", {"amount": "5"}, token=token)
        assert response.status_code == 403
    assert org_row(db, org.id).credits == 1000


def test_same_origin_and_referer_pass(console: Console, db: Database, org: Org) -> None:
    token = console.token()
    response = console.client.post(
        f"/console/organizations/{org.id}/credits",
        data={"amount": "5", "csrf_token": token},
        headers={**AUTH, "Referer": f"http://{HOST}/console/organizations/{org.id}"},
    )
    assert response.status_code == 303
    # Neither header (some privacy tools strip both): the token alone decides.
    response = console.client.post(
        f"/console/organizations/{org.id}/credits", data={"amount": "5", "csrf_token": token}, headers=AUTH
    )
    assert response.status_code == 303
    assert org_row(db, org.id).credits == 1010


def test_no_get_changes_anything(console: Console, db: Database, org: Org) -> None:
    for path in (
        f"/console/organizations/{org.id}/keys",
        f"/console/organizations/{org.id}/webhook-secret/rotate",
        f"/console/organizations/{org.id}/credits",
        "/console/deliveries/redeliver",
    ):
        assert console.get(path).status_code == 405, path


# 3. Pages


def test_overview_shows_each_organization_with_its_load(
    console: Console, db: Database, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    submit(db, org)  # queued
    finished_with_failed_webhook(db, org)  # finished just now, its delivery failed
    page = html(console.get("/console/"))
    row = page[page.index(f'data-org-id="{org.id}"') :]
    row = row[: row.index("</tr>")]
    assert "1 / 100000" in row  # queued / queue limit
    assert 'data-test="drain">0.2<' in row  # 1 finished in 5 minutes
    assert 'data-test="deliveries-failed">1<' in row
    assert 'data-test="credits">' in row
    assert 'data-test="worker">tasks@h1<' in page
    assert 'href="http://127.0.0.1:5555/"' in page  # Flower, at HTTP_HOST:FLOWER_PORT


def test_overview_tolerates_workers_that_do_not_answer(
    console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views.workers, "seen", lambda c: workers.WorkersSeen([], False, "OperationalError"))
    page = html(console.get("/console/"))
    assert 'data-test="workers-unknown"' in page and "OperationalError" in page


def test_workers_seen_is_bounded_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    class Inspect:
        def __init__(self, answer: Any) -> None:
            self.answer = answer

        def ping(self) -> Any:
            if isinstance(self.answer, Exception):
                raise self.answer
            if self.answer == "hang":
                time.sleep(1)
                return {"late@h": {"ok": "pong"}}
            return self.answer

    class FakeCelery:
        def __init__(self, answer: Any) -> None:
            self.control = self
            self.answer = answer
            self.asked = 0

        def inspect(self, timeout: float) -> Inspect:
            self.asked += 1
            return Inspect(self.answer)

    monkeypatch.setattr(workers, "WAIT_SECONDS", 0.2)
    monkeypatch.setattr(workers, "CACHE_SECONDS", 0.5)
    workers.forget()
    answering = FakeCelery({"tasks@h1": {"ok": "pong"}, "webhooks@h1": {"ok": "pong"}})
    assert SEEN(answering) == workers.WorkersSeen(["tasks@h1", "webhooks@h1"], True)
    time.sleep(0.1)
    assert SEEN(answering).answered and answering.asked == 1  # kept: one broadcast for many views
    workers.forget()
    broken = SEEN(FakeCelery(ConnectionError("broker down")))
    assert (broken.answered, broken.error) == (False, "ConnectionError")
    workers.forget()
    slow = FakeCelery("hang")
    started = time.monotonic()
    assert SEEN(slow) == workers.WorkersSeen([], False, "no answer yet")  # the page does not wait for it
    assert time.monotonic() - started < 0.9
    time.sleep(1.0)
    assert SEEN(slow).names == ["late@h"]  # the next view reads its answer
    # Once old, the answer is still shown at once while a new ping runs.
    time.sleep(0.6)
    started = time.monotonic()
    assert SEEN(slow).names == ["late@h"] and time.monotonic() - started < 0.5
    time.sleep(0.2)  # the new ping, on its thread
    assert slow.asked == 2
    time.sleep(1.1)
    workers.forget()


def test_circuits_show_open_hosts_escaped_or_none(console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.services.circuits as circuits

    assert 'data-test="circuits-none"' in html(console.get("/console/"))  # the real snapshot, empty Redis
    opened = [
        {
            "host": HOSTILE,
            "state": "open",
            "consecutive_failures": 7,
            "opened_at": "t0",
            "next_probe_at": "t1",
        }
    ]
    monkeypatch.setattr(circuits, "snapshot", lambda redis: opened)
    for path in ("/console/", "/console/deliveries"):
        page = html(console.get(path))
        assert 'data-test="circuit-row"' in page and "<td>7</td>" in page
        assert HOSTILE not in page and "&lt;script&gt;" in page


def test_circuits_read_n_a_when_unknown(console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "app.services.circuits", None)  # importing it raises ImportError
    page = html(console.get("/console/"))
    assert 'data-test="circuits-unknown"' in page and "n/a" in page


def test_organization_page_shows_credits_ledger_limits_keys_and_audit(
    console: Console, db: Database, org: Org
) -> None:
    page = html(console.get(f"/console/organizations/{org.id}"))
    for marker in (
        'id="limits-form"',
        'id="credit-form"',
        'id="key-create-form"',
        'id="rotate-secret-form"',
        'id="ledger"',
        'id="audit"',
        'data-test="key-revoke-form"',
        'data-test="credits">1000<',
    ):
        assert marker in page, marker
    assert console.token(f"/console/organizations/{org.id}")  # every form of the page carries the token
    assert org.api_key not in page and org.webhook_secret not in page  # neither is ever shown
    assert org.api_key.split("_")[1] in page  # the key's prefix is
    assert console.get("/console/organizations/org_nope").status_code == 404


def test_the_ledger_is_paginated_latest_first(console: Console, db: Database, org: Org) -> None:
    from app.services import organizations

    with db.session() as s:
        for amount in range(1, 61):
            organizations.grant_credits(s, org.id, amount)
    first = html(console.get(f"/console/organizations/{org.id}"))
    assert first.count('data-test="ledger-row"') == 50
    assert first.index("<td>+60</td>") < first.index("<td>+59</td>")
    after = re.search(r'id="ledger-next" data-test="ledger-next" href="([^"]+)"', first)
    assert after is not None
    second = html(console.get(after.group(1).replace("&amp;", "&")))
    assert second.count('data-test="ledger-row"') == 11  # 10 grants and the creation's 1000
    assert "<td>+1000</td>" in second and "ledger-next" not in second


def test_overview_jump_to_an_organization(console: Console, org: Org) -> None:
    response = console.get(f"/console/organizations?org={org.id}")
    assert response.status_code == 303 and response.headers["Location"].endswith(
        f"/console/organizations/{org.id}"
    )


def test_task_search_by_each_filter(console: Console, db: Database, org: Org) -> None:
    other = make_org(db, "other")
    keyed = submit(db, org, idempotency_key="order-1")
    plain = submit(db, org)
    done = submit(db, other)
    run.execute(db, REG, RUN, done)

    def found(**args: str) -> list[str]:
        response = console.get("/console/tasks", query_string=args)
        assert response.status_code == 200, html(response)
        return re.findall(r'data-task-id="([^"]+)"', html(response))

    assert found() == [done, plain, keyed]  # newest first, every organization
    assert found(task_id=keyed) == [keyed]
    assert found(organization_id=org.id) == [plain, keyed]
    assert found(organization_id=org.id, idempotency_key="order-1") == [keyed]
    assert found(status="succeeded") == [done]
    assert found(organization_id=other.id, type="echo") == [done]
    assert found(task_id="task_nope") == []
    with db.session() as s:
        created = s.get(Task, plain)
        assert created is not None
        at = created.created_at
    after = (at + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
    before = (at - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
    assert found(created_from=after) == []
    assert found(created_from=before, created_to=after) == [done, plain, keyed]
    # Filters with no index without the organization are refused, not scanned.
    for args in ({"idempotency_key": "order-1"}, {"type": "echo"}, {"status": "nope"}, {"created_from": "x"}):
        response = console.get("/console/tasks", query_string=args)
        assert response.status_code == 400 and 'data-test="search-errors"' in html(response)


def test_task_search_pages(console: Console, db: Database, org: Org) -> None:
    ids = [submit(db, org) for _ in range(55)]
    first = html(console.get("/console/tasks", query_string={"organization_id": org.id}))
    assert first.count('data-test="task-row"') == 50
    following = re.search(r'<a href="([^"]+)" id="tasks-next"', first)
    assert following is not None
    second = html(console.get(following.group(1).replace("&amp;", "&")))
    assert re.findall(r'data-task-id="([^"]+)"', second) == list(reversed(ids[:5]))
    assert 'id="tasks-next"' not in second


def test_task_page_shows_timeline_payloads_and_deliveries(console: Console, db: Database, org: Org) -> None:
    task_id, delivery_id = finished_with_failed_webhook(db, org)
    page = html(console.get(f"/console/tasks/{task_id}"))
    assert re.findall(r'data-event="([^"]+)"', page) == ["task.queued", "task.started", "task.succeeded"]
    assert 'id="task-input"' in page and "&#34;v&#34;: 1" in page
    assert f'data-webhook-id="{delivery_id}"' in page and "HTTP 410" in page
    assert 'id="redeliver-form"' in page and 'id="cancel-form"' not in page  # final: nothing to cancel
    assert console.get("/console/tasks/task_01aaaaaaaaaaaaaaaaaaaaaaaa").status_code == 404


def test_a_large_input_is_cut_and_everything_is_escaped(console: Console, db: Database) -> None:
    hostile = make_org(db, HOSTILE)
    task_id = submit(db, hostile, input={"html": "</pre>" + HOSTILE, "pad": "x" * 20_000})
    for path in (
        f"/console/tasks/{task_id}",
        "/console/",
        f"/console/organizations/{hostile.id}",
        "/console/tasks",
    ):
        page = html(console.get(path))
        assert "<script>" not in page and "</pre><script>" not in page, path
    page = html(console.get(f"/console/tasks/{task_id}"))
    assert "&lt;script&gt;" in page and 'data-test="input-cut"' in page
    shown = re.search(r'<pre id="task-input" data-test="task-input">(.*?)</pre>', page, re.S)
    assert shown is not None and len(shown.group(1)) < 11 * 1024


def test_deliveries_page_groups_failing_hosts(console: Console, db: Database, org: Org) -> None:
    finished_with_failed_webhook(db, org, "https://Hooks.Example/a")
    finished_with_failed_webhook(db, org, "https://hooks.example/b")
    finished_with_failed_webhook(db, org, f"https://other.example/?q={HOSTILE}")
    page = html(console.get("/console/deliveries"))
    rows = re.findall(r'data-host="([^"]+)"><td>[^<]*</td><td data-test="host-failed">(\d+)<', page)
    assert rows == [("hooks.example", "2"), ("other.example", "1")]
    assert 'id="bulk-redeliver-form"' in page and "<script>" not in page


# 4. Actions: each through the services or use cases, each with one audit record


def test_limits_edit_with_a_bad_value_changes_nothing(
    console: Console, db: Database, fake_redis: Any
) -> None:
    org = make_org(db, queue_limit=100, concurrency_limit=4)
    for form in (
        {"queue_limit": "-1", "concurrency_limit": "4"},
        {"queue_limit": "5", "concurrency_limit": "0"},
        {"queue_limit": "ten"},
        {"queue_limit": "", "concurrency_limit": ""},
    ):
        response = console.post(f"/console/organizations/{org.id}/limits", form)
        assert response.status_code == 400, form
        assert 'data-test="form-errors"' in html(response)
        changed = org_row(db, org.id)
        assert (changed.queue_limit, changed.concurrency_limit) == (100, 4)
    assert audits(db) == []
    assert not fake_redis.keys("*climit*")


def test_limits_edit_saves_tells_the_dispatcher_and_is_audited(
    console: Console, console_app: Flask, db: Database
) -> None:
    org = make_org(db, queue_limit=100, concurrency_limit=4)
    response = console.post(
        f"/console/organizations/{org.id}/limits", {"queue_limit": "0", "concurrency_limit": "1"}
    )
    assert response.status_code == 303
    assert "notice=limits-saved" in response.headers["Location"]
    changed = org_row(db, org.id)
    assert (changed.queue_limit, changed.concurrency_limit) == (0, 1)
    dispatcher = console_app.extensions["waybill"].dispatcher
    from app.dispatch import keys

    assert int(dispatcher.redis.hget(keys.CLIMIT, org.id)) == 1
    [record] = audits(db, org.id)
    assert (record.actor, record.action, record.target) == (USER, "limits.set", org.id)
    assert "100 -> 0" in record.summary and "4 -> 1" in record.summary
    page = html(console.get(response.headers["Location"]))
    assert 'data-test="notice"' in page and 'data-test="audit-action">limits.set<' in page


def test_key_create_shows_it_once_and_revoke_locks_the_api_out(
    console: Console, console_app: Flask, db: Database, org: Org
) -> None:
    api = console_app.test_client()
    response = console.post(f"/console/organizations/{org.id}/keys")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    page = html(response)
    new_key = re.search(r'data-test="new-api-key" class="secret">(wb_[^<]+)<', page)
    key_id = re.search(r'data-test="new-key-id">(key_[^<]+)<', page)
    assert new_key is not None and key_id is not None
    assert (
        api.get("/v1/organization", headers={"Authorization": f"Bearer {new_key.group(1)}"}).status_code
        == 200
    )
    assert new_key.group(1) not in html(console.get(f"/console/organizations/{org.id}"))  # never again

    response = console.post(f"/console/organizations/{org.id}/keys/{key_id.group(1)}/revoke")
    assert response.status_code == 303
    assert (
        api.get("/v1/organization", headers={"Authorization": f"Bearer {new_key.group(1)}"}).status_code
        == 401
    )
    assert api.get("/v1/organization", headers=org.headers).status_code == 200  # the other key still works
    assert [(r.action, r.target, r.actor) for r in audits(db, org.id)] == [
        ("key.create", key_id.group(1), USER),
        ("key.revoke", key_id.group(1), USER),
    ]


def test_a_key_of_another_organization_is_not_revoked_through_this_one(
    console: Console, console_app: Flask, db: Database, org: Org
) -> None:
    other = make_org(db, "other")
    with db.session() as s:
        other_key = s.execute(select(ApiKey.id).where(ApiKey.organization_id == other.id)).scalar_one()
    response = console.post(f"/console/organizations/{org.id}/keys/{other_key}/revoke")
    assert response.status_code == 404
    assert console_app.test_client().get("/v1/organization", headers=other.headers).status_code == 200
    assert audits(db) == []


def test_credit_grant_goes_through_the_ledger(console: Console, db: Database, org: Org) -> None:
    response = console.post(
        f"/console/organizations/{org.id}/credits", {"amount": "250", "note": "refund of INC-1"}
    )
    assert response.status_code == 303
    assert org_row(db, org.id).credits == 1250
    with db.session() as s:
        entries = list(
            s.execute(
                select(CreditEntry.kind, CreditEntry.amount).where(CreditEntry.organization_id == org.id)
            )
        )
    assert sorted(entries) == [("grant", 250), ("grant", 1000)]
    [record] = audits(db, org.id)
    assert (record.actor, record.action) == (USER, "credits.grant")
    assert "+250" in record.summary and "1250" in record.summary and "INC-1" in record.summary
    # Below zero, or zero: refused, nothing written.
    for amount in ("-5000", "0", "1.5"):
        assert console.post(f"/console/organizations/{org.id}/credits", {"amount": amount}).status_code == 400
    assert org_row(db, org.id).credits == 1250 and len(audits(db)) == 1


def test_webhook_secret_rotation(console: Console, db: Database, org: Org) -> None:
    response = console.post(f"/console/organizations/{org.id}/webhook-secret/rotate")
    assert response.status_code == 303
    rotated = org_row(db, org.id)
    assert rotated.webhook_secret != org.webhook_secret
    assert rotated.previous_webhook_secret == org.webhook_secret
    assert rotated.webhook_secret not in html(console.get(f"/console/organizations/{org.id}"))
    [record] = audits(db, org.id)
    assert (record.actor, record.action, record.target) == (USER, "webhook_secret.rotate", org.id)


def test_cancel_refunds_and_is_audited(
    console: Console, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    task_id = submit(db, org)
    assert 'id="cancel-form"' in html(console.get(f"/console/tasks/{task_id}"))
    assert console.token(f"/console/tasks/{task_id}")
    response = console.post(f"/console/tasks/{task_id}/cancel")
    assert response.status_code == 303 and "notice=task-canceled" in response.headers["Location"]
    with db.session() as s:
        task = s.get(Task, task_id)
        assert task is not None and task.status == "canceled" and task.refunded
    assert org_row(db, org.id).credits == 1000
    [record] = audits(db, org.id)
    assert (record.actor, record.action, record.target) == (USER, "task.cancel", task_id)
    # Once final: 409, as the API answers, and no second record.
    response = console.post(f"/console/tasks/{task_id}/cancel")
    assert response.status_code == 409 and 'data-test="error"' in html(response)
    assert len(audits(db)) == 1


def test_redeliver_sends_the_events_again_and_is_audited(
    console: Console, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    task_id, delivery_id = finished_with_failed_webhook(db, org)
    assert delivery_status(db, delivery_id) == "failed"
    response = console.post(f"/console/tasks/{task_id}/redeliver")
    assert response.status_code == 303
    assert delivery_status(db, delivery_id) == "pending"
    assert delivery_id in [d for d, _ in publisher.deliveries]
    [record] = audits(db, org.id)
    assert (record.actor, record.action, record.target) == (USER, "task.redeliver", task_id)
    # A task without a webhook has nothing to deliver: 409, no record.
    plain = submit(db, org)
    assert console.post(f"/console/tasks/{plain}/redeliver").status_code == 409
    assert len(audits(db)) == 1


def test_bulk_redelivery_queues_the_failed_deliveries(
    console: Console, db: Database, org: Org, publisher: RecordingPublisher
) -> None:
    _, to_a = finished_with_failed_webhook(db, org, "https://a.example/hook")
    _, to_b = finished_with_failed_webhook(db, org, "https://b.example/hook")
    since = (utcnow() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    response = console.post(
        "/console/deliveries/redeliver", {"organization_id": org.id, "since": since, "host": "a.example"}
    )
    assert response.status_code == 303
    assert "count=1" in response.headers["Location"]
    assert (delivery_status(db, to_a), delivery_status(db, to_b)) == ("pending", "failed")
    assert to_a in [d for d, _ in publisher.deliveries]
    [record] = audits(db, org.id)
    assert (record.actor, record.action, record.target) == (USER, "deliveries.redeliver_failed", org.id)
    assert "1 failed deliveries" in record.summary and "a.example" in record.summary
    assert "Failed deliveries queued again: 1." in html(console.get(response.headers["Location"]))
    # Without the host: the rest.
    console.post("/console/deliveries/redeliver", {"organization_id": org.id, "since": since})
    assert delivery_status(db, to_b) == "pending" and len(audits(db)) == 2


@pytest.mark.parametrize(
    "form",
    [
        {"since": "2026-01-01T00:00"},  # no organization
        {"organization_id": "org_nope", "since": "2026-01-01T00:00"},
        {"organization_id": "ORG", "since": "soon"},
        {"organization_id": "ORG"},  # no time
    ],
)
def test_bulk_redelivery_refuses_an_incomplete_form(
    console: Console, db: Database, org: Org, form: dict[str, str]
) -> None:
    form = {name: org.id if value == "ORG" else value for name, value in form.items()}
    response = console.post("/console/deliveries/redeliver", form)
    assert response.status_code == 400 and 'data-test="bulk-errors"' in html(response)
    assert audits(db) == []


def test_the_audit_is_shown_latest_first_with_the_user(console: Console, db: Database, org: Org) -> None:
    console.post(f"/console/organizations/{org.id}/credits", {"amount": "1"})
    console.post(f"/console/organizations/{org.id}/webhook-secret/rotate")
    page = html(console.get(f"/console/organizations/{org.id}"))
    actions = re.findall(r'data-test="audit-action">([^<]+)<', page)
    assert actions == ["webhook_secret.rotate", "credits.grant"]
    assert page.count(f'data-test="audit-actor">{USER}<') == 2


@pytest.fixture
def hostile_user_app(
    settings: Settings, db: Database, publisher: RecordingPublisher, fake_redis: fakeredis.FakeRedis
) -> Iterator[Flask]:
    yield create_app(
        settings.with_overrides(console_basic_auth=f"{HOSTILE}:pw"),
        db=db,
        publisher=publisher,
        redis_client=fake_redis,
    )


def test_even_the_user_name_is_escaped(hostile_user_app: Flask) -> None:
    page = html(hostile_user_app.test_client().get("/console/", headers=basic(HOSTILE, "pw")))
    assert "<script>" not in page and "&lt;script&gt;" in page
