"""The operator console: server-rendered pages at ``/console/`` behind HTTP Basic credentials.

``docs/operations.rst`` ("Console") describes the pages. Every action goes
through the use cases and services the API and the CLI use, and leaves an
``audit_records`` row. The credentials are ``CONSOLE_BASIC_AUTH``:
``waybill serve`` refuses to start without them outside the local run
(:func:`refusal`), and the local run generates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flask import Flask

from config import Settings


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


def parse_credentials(value: str) -> Credentials | None:
    """``user:password`` (the password may hold colons); None when empty or either half is."""
    user, sep, password = value.partition(":")
    if not sep or not user.strip() or not password:
        return None
    return Credentials(user, password)


def refusal(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """Why the web process must not start with these settings, or None when it may.

    The console serves organizations' keys and credits, so it never starts
    open: outside the local run it needs ``CONSOLE_BASIC_AUTH``, unless the
    operator turned it off (``CONSOLE_ENABLED=false``: no console route at all).
    """
    if not settings.console_enabled:
        return None
    if settings.console_basic_auth:
        if parse_credentials(settings.console_basic_auth) is None:
            return "CONSOLE_BASIC_AUTH must be user:password, with neither empty"
        return None
    from app.cli import LOCAL_RUN_ENV

    if environ.get(LOCAL_RUN_ENV) == "1":
        return None
    return (
        "refusing to start the web process without CONSOLE_BASIC_AUTH=user:password for the operator "
        "console (/console/); set it, or CONSOLE_ENABLED=false to serve the API without a console"
    )


def init_app(app: Flask, settings: Settings) -> None:
    """Mount the console unless it is turned off.

    Without usable credentials (a WSGI server started on ``app.wsgi:app``
    directly, bypassing ``waybill serve``'s check) the console is mounted
    but closed: every page answers 503 saying what to set, never a page.
    """
    if not settings.console_enabled:
        return
    from app.console import views

    # Not logged when missing: the Celery processes build this app too, and
    # need no console credentials; the 503 says what to set where it is seen.
    app.extensions["waybill.console"] = parse_credentials(settings.console_basic_auth)
    app.register_blueprint(views.bp)
