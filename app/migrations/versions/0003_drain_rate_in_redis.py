"""drop the organization's drain-rate columns: dispatch keeps the rate in Redis

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 17:45:00

The rate behind a 429's Retry-After is now updated by the dispatch step, in
the same Redis script that releases the task, instead of in every claim's
SQL transaction (one row lock and one write fewer per task run).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.drop_column("drain_updated_at")
        batch_op.drop_column("drain_rate")


def downgrade() -> None:
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drain_rate", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("drain_updated_at", sa.DateTime(timezone=True), nullable=True))
