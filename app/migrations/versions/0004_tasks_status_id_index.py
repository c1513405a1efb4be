"""index tasks by (status, id): the sweep's walk over every queued task

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 18:40:00

The sweep now checks every queued task against Redis, whatever its
``dispatched_at`` (a Redis restored from an older snapshot may have lost a
task it had confirmed), in id order from a cursor; this index makes each
batch a range scan.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_status_id", "tasks", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_status_id", table_name="tasks")
