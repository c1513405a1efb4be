from __future__ import annotations

import redis
from flask import Flask

from app.container import Waybill
from app.db import Database
from app.dispatch import Publisher
from app.services.task_types import Registry
from app.services.waiting import Waiter
from config import Settings


def create_app(
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    registry: Registry | None = None,
    publisher: Publisher | None = None,
    redis_client: redis.Redis | None = None,
) -> Flask:
    """The Flask app with its Celery app bound to it (``app.extensions["celery"]``).

    Tests pass their own database, registry or publisher; production builds
    them all from ``settings`` (by default, the environment).
    """
    from app.api import register_api
    from app.broker import CeleryPublisher
    from app.celery_app import celery_init_app
    from app.console import init_app as init_console
    from app.logs import configure_logging

    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    flask_app = Flask("waybill")
    flask_app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    flask_app.json.sort_keys = False  # type: ignore[attr-defined]  # keep field order of the spec
    celery = celery_init_app(flask_app, settings)
    flask_app.extensions["waybill"] = Waybill(
        settings=settings,
        db=db or Database.from_settings(settings),
        registry=registry or Registry.from_entry_points(),
        publisher=publisher or CeleryPublisher(celery),
        redis_client=redis_client,
        waiter=Waiter(settings.wait_max_concurrent),
    )
    register_api(flask_app)
    # The operator console (/console/), behind CONSOLE_BASIC_AUTH; off with CONSOLE_ENABLED=false.
    init_console(flask_app, settings)
    return flask_app
