from __future__ import annotations

from dataclasses import dataclass, field

import redis
from flask import Flask

from app.db import Database
from app.services.dispatch import Dispatcher, DispatchSettings, Publisher
from app.services.task_types import Registry
from app.services.waiting import Waiter
from config import Settings


@dataclass
class Waybill:
    """What every request and every task needs, built once per process."""

    settings: Settings
    db: Database
    registry: Registry
    publisher: Publisher
    redis_client: redis.Redis | None = None
    _dispatcher: Dispatcher | None = None
    waiter: Waiter = field(default_factory=lambda: Waiter(8))

    @property
    def redis(self) -> redis.Redis:
        if self.redis_client is None:
            # Short timeouts: a Redis that is down must not hold a request;
            # what could not reach Redis is recovered by the sweep.
            self.redis_client = redis.Redis.from_url(
                self.settings.resolved_redis_url(),
                socket_connect_timeout=2,
                socket_timeout=5,
                health_check_interval=30,
            )
        return self.redis_client

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            s = self.settings
            self._dispatcher = Dispatcher(
                self.redis,
                DispatchSettings(
                    queue_target=s.dispatch_queue_target,
                    release_lease_seconds=s.dispatch_release_lease_seconds,
                ),
            )
        return self._dispatcher


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
    from app.logs import configure_logging

    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    flask_app = Flask("waybill")
    flask_app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    flask_app.json.sort_keys = False  # type: ignore[attr-defined]  # keep field order of the spec
    celery = celery_init_app(flask_app, settings)
    flask_app.extensions["waybill"] = Waybill(
        settings=settings,
        db=db or Database(settings.resolved_database_url()),
        registry=registry or Registry.from_entry_points(),
        publisher=publisher or CeleryPublisher(celery),
        redis_client=redis_client,
        waiter=Waiter(settings.wait_max_concurrent),
    )
    register_api(flask_app)
    return flask_app
