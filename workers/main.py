"""Worker entry point: ``celery -A workers.main worker`` (and ``beat``, ``flower``)."""

import sys

from app import create_app
from app.redis_conn import kombu_broker
from config import Settings


def _settings() -> Settings:
    """The settings, or exit with the one line that says what is missing.

    celery reports an exception raised while it imports this module as a
    traceback under "Unable to load celery application"; SystemExit passes
    through it, so the operator reads the cause alone (for instance that
    REDIS_URL is not set and no embedded Redis is running).
    """
    try:
        settings = Settings.from_env()
        settings.resolved_redis_url()
        kombu_broker(settings.resolved_broker_url())  # refuses a Redis Cluster as the broker
    except (ValueError, RuntimeError) as exc:
        sys.exit(f"waybill: {exc}")
    return settings


celery = create_app(_settings()).extensions["celery"]
