"""Per-request plumbing: request ids, the JSON body, authentication, the session."""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, current_app, g, request
from sqlalchemy.orm import Session
from werkzeug.exceptions import BadRequest, UnsupportedMediaType

from app.factory import Waybill
from app.logs import request_id_var
from app.services import organizations
from app.services.errors import ServiceError, ValidationFailed

log = logging.getLogger("waybill.http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class Unauthorized(ServiceError):
    status = 401
    type_slug = "unauthorized"
    title = "Missing or invalid API key"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers["WWW-Authenticate"] = 'Bearer realm="waybill"'


def waybill() -> Waybill:
    wb: Waybill = current_app.extensions["waybill"]
    return wb


@contextmanager
def session() -> Iterator[Session]:
    with waybill().db.session() as s:
        yield s


@contextmanager
def read_session() -> Iterator[Session]:
    with waybill().db.read_session() as s:
        yield s


def init_app(app: Flask) -> None:
    @app.before_request
    def _request_id() -> None:
        g.started = time.monotonic()
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _REQUEST_ID.match(given) else "req_" + secrets.token_hex(8)
        request_id_var.set(g.request_id)

    @app.after_request
    def _echo_request_id(response: Any) -> Any:
        if "request_id" in g:
            response.headers["X-Request-Id"] = g.request_id
        if request.path not in ("/healthz", "/metrics"):
            log.info(
                "http request",
                extra={
                    "event": "http.request",
                    "method": request.method,
                    "path": request.path,
                    "http_status": response.status_code,
                    "duration_ms": int((time.monotonic() - g.get("started", time.monotonic())) * 1000),
                    "organization_id": g.get("organization_id"),
                },
            )
        return response


class TooManyAuthFailures(ServiceError):
    status = 429
    type_slug = "too-many-authentication-failures"
    title = "Too many failed authentications"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "Too many requests with a missing or invalid API key from this address; "
            f"retry after {retry_after} s."
        )
        self.headers["Retry-After"] = str(retry_after)


def _auth_failure_key(minute: int) -> str:
    # remote_addr: behind a reverse proxy, configure it to pass the client
    # address (werkzeug's ProxyFix) or this limits the proxy as a whole.
    return f"waybill:authfail:{request.remote_addr or 'unknown'}:{minute}"


# Addresses this process has seen go over the limit, until the end of that
# minute: (address, minute). Only failures touch Redis (INCR returns the
# count), so an authenticated request costs no Redis round trip; another
# process learns of a blocked address at that address's next failure there.
_blocked: set[tuple[str, int]] = set()
_blocked_lock = threading.Lock()


def _check_blocked(minute: int) -> None:
    if (request.remote_addr or "unknown", minute) in _blocked:
        raise TooManyAuthFailures(retry_after=60 - int(time.time()) % 60)


def _note_auth_failure(minute: int) -> None:
    limit = waybill().settings.auth_failures_per_minute
    if limit <= 0:
        return
    try:
        key = _auth_failure_key(minute)
        pipe = waybill().redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        count = int(pipe.execute()[0])
    except Exception:  # Redis away: authentication still works, unthrottled
        return
    if count > limit:
        with _blocked_lock:
            _blocked.difference_update({b for b in _blocked if b[1] < minute})
            _blocked.add((request.remote_addr or "unknown", minute))
        raise TooManyAuthFailures(retry_after=60 - int(time.time()) % 60)


def organization_id() -> str:
    """The authenticated organization's id; 401, or 429 for an address that keeps failing."""
    minute = int(time.time() // 60)
    _check_blocked(minute)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        _note_auth_failure(minute)
        raise Unauthorized("Send your API key as `Authorization: Bearer <key>`.")
    with read_session() as s:
        org_id = organizations.authenticate(s, token.strip())
    if org_id is None:
        _note_auth_failure(minute)
        raise Unauthorized("The API key is unknown or revoked.")
    g.organization_id = org_id
    return org_id


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_body() -> dict[str, Any]:
    """The request's JSON object; 415 unless it is JSON, 400 unless it parses to an object."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    ):
        raise UnsupportedMediaType("Send the task as JSON with `Content-Type: application/json`.")
    raw = request.get_data(cache=False)  # reads at most MAX_CONTENT_LENGTH bytes, else 413
    try:
        text = raw.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        # PostgreSQL's JSONB cannot hold NUL or lone surrogates: refuse them
        # here, for every database alike, rather than fail at the INSERT.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        if "\\u0000" in text or "\x00" in text:
            raise ValueError("NUL characters are not accepted")
    except UnicodeError:
        raise ValidationFailed({"body": ["Not valid UTF-8."]}, "The body is not valid UTF-8.") from None
    except (ValueError, RecursionError) as exc:
        raise ValidationFailed(
            {"body": [f"Not valid JSON: {exc}"[:200]]}, "The body is not valid JSON."
        ) from None
    if not isinstance(body, dict):
        raise ValidationFailed({"body": ["Must be a JSON object."]})
    return body


__all__ = ["BadRequest", "Unauthorized", "json_body", "organization_id", "read_session", "session", "waybill"]
