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

from flask import Flask, g, request
from sqlalchemy.orm import Session
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

from app.container import current as waybill
from app.dispatch import keys
from app.logs import request_id_var
from app.services import json_limits, organizations
from app.services.errors import NotFound, ServiceError, ValidationFailed

log = logging.getLogger("waybill.http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class Unauthorized(ServiceError):
    status = 401
    type_slug = "unauthorized"
    title = "Missing or invalid API key"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers["WWW-Authenticate"] = 'Bearer realm="waybill"'


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
        _refuse_nul()

    @app.after_request
    def _echo_request_id(response: Any) -> Any:
        if request.environ.get("waybill.close_connection"):
            response.headers["Connection"] = "close"
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


def _refuse_nul() -> None:
    """No string of a request may hold U+0000 (``docs/api.md``); PostgreSQL cannot compare it.

    Checked once for every route, before any view reads the path or the
    query, so that no future route can pass one on to SQL.
    """
    if "\x00" in request.path:
        raise NotFound("No resource at this path.")
    for name, value in request.args.items(multi=True):
        if "\x00" in name or "\x00" in value:
            field = name.replace("\x00", "\\u0000")[:100]
            raise ValidationFailed({field: ["Must not contain U+0000."]})


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


def client_address() -> str:
    """The client's address: the peer, or what the trusted proxies say (``TRUSTED_PROXY_HOPS``)."""
    hops = waybill().settings.trusted_proxy_hops
    if hops > 0:
        forwarded = [a.strip() for a in request.headers.get("X-Forwarded-For", "").split(",") if a.strip()]
        # Each trusted proxy appends the address it received from; the one
        # `hops` from the right was written by the outermost trusted proxy.
        # Anything left of it is the client's own claim and is not believed.
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return request.remote_addr or "unknown"


def _auth_failure_key(address: str, minute: int) -> str:
    return f"{keys.AUTH_FAILURES}{address}:{minute}"


# Addresses this process has seen go over the limit, until the end of that
# minute: (address, minute). Only failures touch Redis (INCR returns the
# count), so an authenticated request costs no Redis round trip; another
# process learns of a blocked address at that address's next failure there.
_blocked: set[tuple[str, int]] = set()
_blocked_lock = threading.Lock()


def _auth_failed(minute: int, error: Unauthorized) -> Unauthorized | TooManyAuthFailures:
    """What to answer a request whose key failed: 401, or 429 once its address is over the limit.

    Only requests that failed authentication are ever limited: a valid key
    from the same address (one NAT, one proxy, many tenants) always gets
    through, whatever others sent from there (``docs/api.md``).
    """
    address = client_address()
    retry = TooManyAuthFailures(retry_after=60 - int(time.time()) % 60)
    if (address, minute) in _blocked:
        return retry
    limit = waybill().settings.auth_failures_per_minute
    if limit <= 0:
        return error
    try:
        key = _auth_failure_key(address, minute)
        pipe = waybill().redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        count = int(pipe.execute()[0])
    except Exception:  # Redis away: authentication still works, unthrottled
        return error
    if count > limit:
        with _blocked_lock:
            _blocked.difference_update({b for b in _blocked if b[1] < minute})
            _blocked.add((address, minute))
        return retry
    return error


def organization_id() -> str:
    """The authenticated organization's id; 401, or 429 for an address that keeps failing."""
    minute = int(time.time() // 60)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _auth_failed(minute, Unauthorized("Send your API key as `Authorization: Bearer <key>`."))
    # A plain connection, not a session: this read is on every request.
    with waybill().db.read_engine.connect() as conn:
        org_id = organizations.authenticate(conn, token.strip())
    if org_id is None:
        raise _auth_failed(minute, Unauthorized("The API key is unknown or revoked."))
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
    """The request's JSON object: 415 unless JSON, 400 unless an object within the limits."""
    body = raw_json_body("task")
    if not isinstance(body, dict):
        raise ValidationFailed({"body": ["Must be a JSON object."]})
    check_json_limits(body)
    return body


def raw_json_body(what: str) -> Any:
    """The request's JSON, any value: 415 unless JSON, 413 over the size limit, 400 unless it parses.

    The limits on what it holds are :func:`check_json_limits`'s, which a
    batch applies to each of its items rather than to the whole body.
    """
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    ):
        raise UnsupportedMediaType(f"Send the {what} as JSON with `Content-Type: application/json`.")
    raw = read_body(waybill().settings.max_body_bytes)
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeError:
        raise ValidationFailed({"body": ["Not valid UTF-8."]}, "The body is not valid UTF-8.") from None
    except RecursionError:
        raise ValidationFailed(
            {"body": [f"Nested more than {json_limits.MAX_INPUT_DEPTH} levels deep."]},
            "The body is nested too deeply.",
        ) from None
    except ValueError as exc:
        raise ValidationFailed(
            {"body": [f"Not valid JSON: {exc}"[:200]]}, "The body is not valid JSON."
        ) from None


def check_json_limits(body: dict[str, Any]) -> None:
    """400 naming the first field that holds U+0000 or a lone surrogate, or nests too deeply.

    PostgreSQL cannot store U+0000, and a worker would recurse on a field
    nested deeper than the spec's limit.
    """
    found = json_limits.violation(body, max_depth=None)
    if found is None:
        for name, value in body.items():
            found = json_limits.violation(value, max_depth=json_limits.MAX_INPUT_DEPTH, path=str(name))
            if found is not None:
                break
    if found is not None:
        where, reason = found
        where = where[:200]
        raise ValidationFailed({where: [f"{reason[0].upper()}{reason[1:]}."]})


# A body over the limit is still read, up to this much, before the 413 is
# sent: a client still writing when the server answers and closes gets a
# connection reset instead of the answer. Past it the connection is closed.
DRAIN_LIMIT_BYTES = 16 * 1024 * 1024


def read_body(limit: int) -> bytes:
    """At most ``limit`` bytes of the body, whatever its framing; 413 (after draining) beyond it.

    Content-Length and chunked bodies alike are read from the WSGI input
    directly: werkzeug applies ``MAX_CONTENT_LENGTH`` to the declared length,
    and a chunked body, which declares none, was cut at the limit and parsed.
    """
    stream = request.environ["wsgi.input"]
    declared = request.content_length
    if declared is not None and declared > limit:
        _drain(stream, declared)
        raise RequestEntityTooLarge()
    want = declared if declared is not None else limit + 1
    chunks: list[bytes] = []
    size = 0
    while size < want:
        chunk = stream.read(min(65536, want - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        _drain(stream, DRAIN_LIMIT_BYTES)
        raise RequestEntityTooLarge()
    return b"".join(chunks)


def _drain(stream: Any, declared: int) -> None:
    left = min(declared, DRAIN_LIMIT_BYTES)
    while left > 0:
        chunk = stream.read(min(65536, left))
        if not chunk:
            return
        left -= len(chunk)
    if declared > DRAIN_LIMIT_BYTES:
        # Too much to read: say so, and let the server close the connection.
        request.environ["waybill.close_connection"] = True


__all__ = ["BadRequest", "Unauthorized", "json_body", "organization_id", "read_session", "waybill"]
