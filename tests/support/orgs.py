"""Organizations for tests and benchmarks, created in SQL as ``waybill org create`` does."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from app.db import Database
from app.models import Base, CreditEntry, Organization
from app.services import organizations


@dataclass(frozen=True)
class Org:
    id: str
    api_key: str
    webhook_secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def make_org(
    db: Database,
    name: str = "acme",
    *,
    credits: int = 1000,
    queue_limit: int = 100_000,
    concurrency_limit: int = 10,
) -> Org:
    with db.session() as s:
        created = organizations.create_organization(
            s, name, credits=credits, queue_limit=queue_limit, concurrency_limit=concurrency_limit
        )
        return Org(created.organization.id, created.key.api_key, created.organization.webhook_secret)


def empty_tables(db: Database) -> None:
    """Delete every row, children first; the schema (and Alembic's version) stays."""
    with db.engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


def organization(db: Database, org_id: str) -> Organization:
    """The organization's row as it is now (credits and counters)."""
    with db.session() as s:
        org = s.get(Organization, org_id)
        assert org is not None
        return org


def ledger_sum(db: Database, org_id: str) -> int:
    """The sum of the organization's ledger: its balance must always equal it."""
    with db.session() as s:
        total = select(func.coalesce(func.sum(CreditEntry.amount), 0)).where(
            CreditEntry.organization_id == org_id
        )
        return int(s.execute(total).scalar_one())
