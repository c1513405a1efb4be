"""Fixtures shared by unit and integration tests.

The database is ``DATABASE_URL`` when it is set (CI points it at PostgreSQL)
and a temporary SQLite file otherwise. It is migrated once per session with
the real Alembic migrations and emptied after every test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from app import create_app
from app.db import Database
from app.embedded_redis import EmbeddedRedis
from app.migrate import upgrade
from app.models import Base
from config import Settings
from tests.support import Org, empty_tables, make_org


@pytest.fixture(scope="session")
def shared_redis_url() -> Iterator[str]:
    """A real Redis for tests that start processes.

    ``REDIS_URL`` when CI gives one (a database index of our own), else an embedded server.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(
        Path(os.environ.get("TMPDIR", "/tmp")) / f"waybill-test-redis-{os.getpid()}", persist=False
    )
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = os.environ.get("DATABASE_URL") or ""
    if not url:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'waybill.sqlite3'}"
    return url


@pytest.fixture(scope="session")
def migrated(database_url: str) -> str:
    db = Database(database_url)
    with db.engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    db.dispose()
    upgrade(database_url)
    return database_url


@pytest.fixture
def db(migrated: str) -> Iterator[Database]:
    database = Database(migrated)
    empty_tables(database)
    yield database
    empty_tables(database)
    database.dispose()


@pytest.fixture
def settings(tmp_path: Path, migrated: str) -> Settings:
    return Settings.from_env(
        {},
        var_dir=str(tmp_path / "var"),
        database_url=migrated,
        redis_url="redis://127.0.0.1:1/0",
        webhook_allow_private=False,
    )


@dataclass
class RecordingPublisher:
    """Stands in for Celery in unit tests; ``fail`` makes every publish raise."""

    tasks: list[str] = field(default_factory=list)
    deliveries: list[tuple[str, float | None]] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    fail: bool = False

    def run_task(self, task_id: str, label: object = None) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.tasks.append(task_id)

    def deliver_webhook(self, delivery_id: str, countdown: float | None = None) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.deliveries.append((delivery_id, countdown))

    def revoke(self, task_id: str) -> None:
        self.revoked.append(task_id)


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def fake_redis(fake_server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fake_server)


@pytest.fixture
def app(
    settings: Settings, db: Database, publisher: RecordingPublisher, fake_redis: fakeredis.FakeRedis
) -> Flask:
    return create_app(settings, db=db, publisher=publisher, redis_client=fake_redis)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def org(db: Database) -> Org:
    return make_org(db)
