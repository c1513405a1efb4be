"""audit records of the operator console

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 00:00:00

``audit_records``: one row per action an operator takes in the console
(``/console/``): who (the Basic-auth user), what (the action, its target and
a summary), when. Listed per organization, latest first, by
``(organization_id, id)``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=40), nullable=True),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_records")),
    )
    op.create_index("ix_audit_records_org_id", "audit_records", ["organization_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_records_org_id", table_name="audit_records")
    op.drop_table("audit_records")
