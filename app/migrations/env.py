"""Alembic environment: the URL comes from the caller (``waybill db upgrade``) or Settings."""

from __future__ import annotations

from alembic import context

from app.db import make_engine
from app.models import Base
from config import Settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or Settings.from_env().resolved_database_url()


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # Behind PgBouncer in transaction mode, migrations keep no session state either.
    engine = make_engine(url, transaction_pooling=Settings.from_env().database_transaction_pooling)
    with engine.connect() as connection:
        # Batch mode lets later migrations ALTER tables on SQLite too.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
