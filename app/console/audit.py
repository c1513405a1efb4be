"""The console's audit trail: one ``audit_records`` row per action an operator takes."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import Database
from app.models import AuditRecord
from app.models.base import utcnow

PAGE = 50


def record(
    session: Session, *, actor: str, action: str, target: str, summary: str, organization_id: str | None
) -> AuditRecord:
    """Add the record to ``session``: in the action's own transaction when the console holds it."""
    row = AuditRecord(
        at=utcnow(),
        actor=actor[:200],
        action=action,
        organization_id=organization_id,
        target=target[:200],
        summary=summary,
    )
    session.add(row)
    session.flush()
    return row


def record_after(
    db: Database, *, actor: str, action: str, target: str, summary: str, organization_id: str | None
) -> None:
    """A record of an action a use case already committed in a transaction of its own."""
    with db.session() as s:
        record(s, actor=actor, action=action, target=target, summary=summary, organization_id=organization_id)


def latest(session: Session, organization_id: str, *, limit: int = PAGE) -> list[AuditRecord]:
    return list(
        session.execute(
            select(AuditRecord)
            .where(AuditRecord.organization_id == organization_id)
            .order_by(AuditRecord.id.desc())
            .limit(limit)
        ).scalars()
    )
