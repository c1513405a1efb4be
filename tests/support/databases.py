"""A fresh, migrated PostgreSQL database of one's own, dropped at the end (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from app.migrate import upgrade


@contextlib.contextmanager
def fresh_postgresql(server_url: str, prefix: str) -> Iterator[str]:
    """A new database ``<prefix>_<hex>`` on the server of ``server_url``, migrated; its URL.

    Created and dropped through ``server_url``'s own database (a connection
    of no pool, so nothing holds it open), migrated directly.
    """
    url = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    fresh = url.set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(fresh)
        yield fresh
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
