"""The migrations build exactly the schema the models declare.

A column added to a model without its migration (or the other way round)
would pass every test that creates tables from the models and break the
first ``waybill db upgrade`` of a real deployment.
"""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from app.migrate import upgrade
from app.models.base import Base


def test_the_migrated_schema_is_the_models_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    upgrade(url)
    _same_schema(url)


def test_the_suites_database_was_migrated_to_the_models_schema(migrated: str) -> None:
    """The database of the run (PostgreSQL in CI's PostgreSQL pass), built by the migrations."""
    _same_schema(migrated)


def _same_schema(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
