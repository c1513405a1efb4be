"""task progress, deadlines and the webhook events a task asks for (spec 1.1)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 00:30:00

* ``progress``: what the task type last reported, ``{"fraction", "message",
  "updatedAt"}``; ``progress_seq`` counts the reports stored, so that a
  task's event ids (``GET /v1/tasks/{id}/events``) are derived from the row.
* ``cancel_after`` (seconds, as submitted) and ``deadline_at`` (the instant);
  the deadline job reads queued and running tasks by ``(status, deadline_at)``.
* ``webhook_events``: the events ``webhook.events`` asked for, comma-separated;
  null for the default (the three final ones).
* ``webhook_deliveries.seq``: a task has one delivery per event, except
  ``task.progress``, which has one per stored report (its ``progress_seq``);
  the unique constraint becomes (task_id, event_type, seq), still the
  backstop against a second final event. An index (organization_id, status,
  created_at) serves bulk redelivery (``POST /v1/deliveries/redeliver``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    json_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("progress", json_type, nullable=True))
        batch_op.add_column(sa.Column("progress_seq", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("cancel_after", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("webhook_events", sa.String(length=200), nullable=True))
        batch_op.create_index("ix_tasks_status_deadline", ["status", "deadline_at"], unique=False)
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.Integer(), nullable=False, server_default="0"))
        batch_op.drop_constraint("uq_webhook_deliveries_task_event", type_="unique")
        batch_op.create_unique_constraint("uq_webhook_deliveries_task_event", ["task_id", "event_type", "seq"])
        batch_op.create_index(
            "ix_webhook_deliveries_org_status_created", ["organization_id", "status", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_org_status_created")
        batch_op.drop_constraint("uq_webhook_deliveries_task_event", type_="unique")
        batch_op.create_unique_constraint("uq_webhook_deliveries_task_event", ["task_id", "event_type"])
        batch_op.drop_column("seq")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_status_deadline")
        batch_op.drop_column("webhook_events")
        batch_op.drop_column("deadline_at")
        batch_op.drop_column("cancel_after")
        batch_op.drop_column("progress_seq")
        batch_op.drop_column("progress")
