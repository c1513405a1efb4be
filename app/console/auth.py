"""Who may use the console (HTTP Basic) and that a form post comes from a console page (CSRF).

The CSRF token is bound to the Basic-auth user with an HMAC whose key is
derived from ``CONSOLE_BASIC_AUTH`` itself: every web process of every host
computes the same token with no shared session store and no second secret
to configure, a token cannot be made without the password, and changing the
password voids every token issued before. It carries its issue time and is
refused after :data:`TOKEN_MAX_AGE_SECONDS` (reload the page for a new one).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlsplit

from flask import Request

from app.console import Credentials

REALM = "Waybill console"
TOKEN_MAX_AGE_SECONDS = 12 * 3600
_CSRF_LABEL = b"waybill console csrf\x00"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def authenticated_user(request: Request, credentials: Credentials) -> str | None:
    """The user when the request carries the console's credentials, else None.

    Both halves are compared as digests with ``compare_digest``, so neither
    their content nor their length shows in the time the answer takes.
    """
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return None
    user = auth.username or ""
    password = auth.password or ""
    user_ok = hmac.compare_digest(_digest(user), _digest(credentials.user))
    password_ok = hmac.compare_digest(_digest(password), _digest(credentials.password))
    return user if user_ok and password_ok else None


def _key(credentials: Credentials) -> bytes:
    return hashlib.sha256(_CSRF_LABEL + f"{credentials.user}:{credentials.password}".encode()).digest()


def _mac(credentials: Credentials, user: str, issued: int) -> str:
    return hmac.new(_key(credentials), f"{user}\n{issued}".encode(), hashlib.sha256).hexdigest()


def csrf_token(credentials: Credentials, user: str, *, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    return f"{issued}.{_mac(credentials, user, issued)}"


def csrf_problem(
    request: Request, credentials: Credentials, user: str, *, now: float | None = None
) -> str | None:
    """Why this POST is refused, or None when its token and origin are the console's own."""
    origin = request.headers.get("Origin")
    if origin is not None:
        # "null" (a sandboxed frame, a cross-origin redirect) is no origin of ours either.
        if origin == "null" or not _same_host(origin, request.host):
            return "the form was posted from another site (Origin)"
    else:
        referer = request.headers.get("Referer")
        if referer and not _same_host(referer, request.host):
            return "the form was posted from another site (Referer)"
    token = request.form.get("csrf_token", "")
    issued_text, _, mac = token.partition(".")
    if not issued_text.isdigit() or len(issued_text) > 12:
        return "the form has no valid CSRF token: reload the page and submit it again"
    issued = int(issued_text)
    current = time.time() if now is None else now
    if not hmac.compare_digest(mac, _mac(credentials, user, issued)):
        return "the form's CSRF token is wrong: reload the page and submit it again"
    if not -60 <= current - issued <= TOKEN_MAX_AGE_SECONDS:
        return "the form's CSRF token has expired: reload the page and submit it again"
    return None


def _same_host(url: str, host: str) -> bool:
    # The host and port only, not the scheme: behind a TLS-terminating proxy
    # the browser says https while this process sees http.
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.lower()
