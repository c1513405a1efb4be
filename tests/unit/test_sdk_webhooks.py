"""waybill_client.verify_webhook on bodies signed as Waybill signs them (app.services.deliveries.sign)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from waybill_client import WebhookVerificationError, verify_webhook

from app.services.deliveries import body_of, sign

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 24).decode()
PAYLOAD: dict[str, Any] = {
    "type": "task.succeeded",
    "timestamp": "2026-11-28T09:45:16.123Z",
    "data": {"taskId": "t1", "type": "echo", "status": "succeeded", "result": {"n": 1}, "cost": 1},
}


def signed(
    payload: Any = PAYLOAD, *, secrets: list[str] | None = None, at: int | None = None
) -> tuple[bytes, dict[str, str]]:
    body = body_of(payload)
    timestamp = int(time.time()) if at is None else at
    headers = {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(timestamp),
        "Webhook-Signature": sign(secrets or [SECRET], "msg_1", timestamp, body),
        "Content-Type": "application/json",
    }
    return body, headers


def test_a_valid_webhook_is_its_event() -> None:
    body, headers = signed()
    event = verify_webhook(body, headers, SECRET)
    assert event.type == "task.succeeded" and event.webhook_id == "msg_1"
    assert event.task.task_id == "t1" and event.task.result == {"n": 1}
    assert event.timestamp is not None and event.timestamp.year == 2026
    assert event.raw == PAYLOAD
    # str bodies and lower-case header names work as well
    assert (
        verify_webhook(body.decode(), {k.lower(): v for k, v in headers.items()}, SECRET).task.task_id == "t1"
    )


def test_either_secret_of_a_rotation_verifies() -> None:
    body, headers = signed(secrets=[OTHER, SECRET])
    assert verify_webhook(body, headers, SECRET).webhook_id == "msg_1"
    assert verify_webhook(body, headers, OTHER).webhook_id == "msg_1"


def test_a_tampered_body_or_header_is_refused() -> None:
    body, headers = signed()
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook(body.replace(b'"n":1', b'"n":2'), headers, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, {**headers, "Webhook-Id": "msg_2"}, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, headers, OTHER)


def test_stale_or_future_timestamps_are_refused() -> None:
    for at in (int(time.time()) - 6 * 60, int(time.time()) + 6 * 60):
        body, headers = signed(at=at)
        with pytest.raises(WebhookVerificationError, match="too"):
            verify_webhook(body, headers, SECRET)
    body, headers = signed(at=int(time.time()) - 60)  # a minute old: fine
    assert verify_webhook(body, headers, SECRET).type == "task.succeeded"


def test_missing_or_malformed_headers_are_refused() -> None:
    body, headers = signed()
    for name in ("Webhook-Id", "Webhook-Timestamp", "Webhook-Signature"):
        with pytest.raises(WebhookVerificationError):
            verify_webhook(body, {k: v for k, v in headers.items() if k != name}, SECRET)
    for bad in ("garbage", "v1,not-base64!", "v2,abc"):
        with pytest.raises(WebhookVerificationError):
            verify_webhook(body, {**headers, "Webhook-Signature": bad}, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, {**headers, "Webhook-Timestamp": "yesterday"}, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(b"\xff\xfe", headers, SECRET)


def test_a_signed_body_that_is_not_an_event_is_refused() -> None:
    for payload in ([1, 2], {"type": "task.succeeded"}, {"type": "x", "data": {"status": "queued"}}):
        body, headers = signed(payload)
        with pytest.raises(WebhookVerificationError, match="not a Waybill event"):
            verify_webhook(body, headers, SECRET)
    body, headers = signed()
    assert json.loads(body) == PAYLOAD


def test_a_malformed_secret_is_a_value_error() -> None:
    body, headers = signed()
    for secret in ("", "whsec_", "whsec_!!!"):
        with pytest.raises(ValueError, match="whsec_"):
            verify_webhook(body, headers, secret)


def test_the_readme_flask_receiver() -> None:
    """clients/python/README.md's receiver, as written there, with Flask's own request headers."""
    from flask import Flask, abort, request

    app = Flask(__name__)
    seen: list[str] = []

    @app.post("/hooks/waybill")
    def waybill_hook() -> tuple[str, int]:
        try:
            event = verify_webhook(request.get_data(), request.headers, SECRET)
        except WebhookVerificationError:
            abort(400)
        seen.append(event.task.task_id)
        return "", 204

    body, headers = signed()
    client = app.test_client()
    assert client.post("/hooks/waybill", data=body, headers=headers).status_code == 204
    tampered = body.replace(b'"n":1', b'"n":2')
    assert client.post("/hooks/waybill", data=tampered, headers=headers).status_code == 400
    assert seen == ["t1"]
