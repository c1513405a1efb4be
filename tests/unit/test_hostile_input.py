"""Hand-picked hostile requests: each gets a clear 4xx problem, none a 5xx, and nothing is stored."""

from __future__ import annotations

import json

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app.db import Database
from app.models import CreditEntry, Task
from tests.support import Org

JSON = "application/json"

CASES: list[tuple[str, bytes, str, dict[str, str], int]] = [
    ("huge body", json.dumps({"type": "echo", "input": "x" * 2_000_000}).encode(), JSON, {}, 413),
    ("deep nesting", b'{"type": "echo", "input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", JSON, {}, 400),
    ("invalid utf-8", b'{"type": "echo", "input": "\xc3\x28"}', JSON, {}, 400),
    ("lone surrogate", b'{"type": "echo", "input": "\\ud800"}', JSON, {}, 400),
    ("nul character", b'{"type": "echo", "input": "a\\u0000b"}', JSON, {}, 400),
    ("form body", b"type=echo", "application/x-www-form-urlencoded", {}, 415),
    ("xml body", b"<task/>", "application/xml", {}, 415),
    ("no content type", b'{"type": "echo"}', "", {}, 415),
    ("infinity", b'{"type": "echo", "input": 1e999}', JSON, {}, 400),
    ("nan", b'{"type": "echo", "input": NaN}', JSON, {}, 400),
    ("int too long", b'{"type": "echo", "input": ' + b"9" * 5000 + b"}", JSON, {}, 400),
    ("absurd sleep", b'{"type": "sleep", "input": {"seconds": 1e308}}', JSON, {}, 400),
    ("negative sleep", b'{"type": "sleep", "input": {"seconds": -0.0001}}', JSON, {}, 400),
    ("bool as seconds", b'{"type": "sleep", "input": {"seconds": true}}', JSON, {}, 400),
    ("type is a list", b'{"type": ["echo"]}', JSON, {}, 400),
    ("type too long", json.dumps({"type": "e" * 10_000}).encode(), JSON, {}, 400),
    (
        "long idempotency key",
        json.dumps({"type": "echo", "idempotencyKey": "k" * 256}).encode(),
        JSON,
        {},
        400,
    ),
    ("control chars in key", json.dumps({"type": "echo", "idempotencyKey": "a\nb"}).encode(), JSON, {}, 400),
    ("long key header", b'{"type": "echo"}', JSON, {"Idempotency-Key": "k" * 300}, 400),
    (
        "header injection in webhook url",
        json.dumps({"type": "echo", "webhook": {"url": "http://example.com/\r\nX-Evil: 1"}}).encode(),
        JSON,
        {},
        400,
    ),
    (
        "webhook url with spaces",
        json.dumps({"type": "echo", "webhook": {"url": "http://exa mple.com/"}}).encode(),
        JSON,
        {},
        400,
    ),
    ("webhook is a string", json.dumps({"type": "echo", "webhook": "http://x"}).encode(), JSON, {}, 400),
    ("metadata is a list", json.dumps({"type": "echo", "metadata": [1]}).encode(), JSON, {}, 400),
    (
        "metadata too big",
        json.dumps({"type": "echo", "metadata": {"ü" * 10: "v" * 4100}}).encode(),
        JSON,
        {},
        400,
    ),
    (
        "fetch with header injection",
        json.dumps(
            {"type": "http.fetch", "input": {"url": "https://e.com", "headers": {"X": "a\r\nB: c"}}}
        ).encode(),
        JSON,
        {},
        400,
    ),
    ("empty body", b"", JSON, {}, 400),
    ("top-level null", b"null", JSON, {}, 400),
]


@pytest.mark.parametrize(
    ("name", "body", "content_type", "headers", "status"), CASES, ids=[c[0] for c in CASES]
)
def test_hostile_requests_are_refused_cleanly(
    client: FlaskClient,
    db: Database,
    org: Org,
    name: str,
    body: bytes,
    content_type: str,
    headers: dict,
    status: int,
) -> None:
    all_headers = {**org.headers, **headers}
    if content_type:
        all_headers["Content-Type"] = content_type
    r = client.post("/v1/tasks", data=body, headers=all_headers)
    assert r.status_code == status, (name, r.status_code, r.get_data(as_text=True)[:300])
    assert r.mimetype == "application/problem+json"
    problem = r.get_json()
    assert problem["status"] == status and problem["detail"]
    with db.session() as s:
        assert s.execute(select(func.count()).select_from(Task)).scalar_one() == 0
        assert s.execute(select(func.count()).where(CreditEntry.kind == "reserve")).scalar_one() == 0


def test_unicode_keys_and_values_round_trip(client: FlaskClient, org: Org) -> None:
    body = {"type": "echo", "input": {"ключ": "値", "emoji 🚚": ["ü", {"ß": None}]}, "metadata": {"ñ": "ok"}}
    r = client.post("/v1/tasks", json=body, headers=org.headers)
    assert r.status_code == 202
    assert r.get_json()["input"] == body["input"] and r.get_json()["metadata"] == {"ñ": "ok"}
