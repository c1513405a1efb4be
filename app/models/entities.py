from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, JSONValue, UTCDateTime, utcnow


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED})


class DeliveryStatus(enum.StrEnum):
    """A webhook delivery (one event): sent until delivered, or failed after its attempts."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookStatus(enum.StrEnum):
    """A task's webhook summary: its latest delivery's status, or none before any event."""

    NONE = "none"
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    credits: Mapped[int] = mapped_column(BigInteger, default=0)
    queue_limit: Mapped[int] = mapped_column(Integer)
    concurrency_limit: Mapped[int] = mapped_column(Integer)
    # Counters kept in the same transactions that move tasks between
    # statuses, so the queue-limit check is one row update, never a COUNT(*).
    queued: Mapped[int] = mapped_column(Integer, default=0)
    running: Mapped[int] = mapped_column(Integer, default=0)
    webhook_secret: Mapped[str] = mapped_column(String(100))
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    previous_webhook_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class CreditEntry(Base):
    """One credit movement; an organization's balance is the sum of its entries."""

    __tablename__ = "credit_entries"
    # A task is reserved once and refunded at most once: the database says so,
    # whatever races the workers run.
    __table_args__ = (UniqueConstraint("task_id", "kind", name="uq_credit_entries_task_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    task_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))  # reserve | refund | grant
    amount: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("organization_id", "idempotency_key", name="uq_tasks_organization_idempotency_key"),
        # Newest-first listing with optional filters; ids sort by creation time.
        Index("ix_tasks_org_id", "organization_id", "id"),
        Index("ix_tasks_org_status_id", "organization_id", "status", "id"),
        Index("ix_tasks_org_type_id", "organization_id", "type", "id"),
        # The sweep's look-ups.
        Index("ix_tasks_status_dispatched", "status", "dispatched_at"),
        Index("ix_tasks_status_lease", "status", "lease_expires_at"),
        Index("ix_tasks_status_id", "status", "id"),
        # The deadline job: queued and running tasks past their deadline_at.
        Index("ix_tasks_status_deadline", "status", "deadline_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    type: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.QUEUED.value)
    input: Mapped[Any] = mapped_column(JSONValue, nullable=True)
    task_metadata: Mapped[Any] = mapped_column("metadata", JSONValue, nullable=True)
    result: Mapped[Any] = mapped_column(JSONValue, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(100), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cost: Mapped[int] = mapped_column(Integer, default=0)
    refunded: Mapped[bool] = mapped_column(Boolean, default=False)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Copied from the task's latest webhook delivery so that polling and
    # listing need no join: none | pending | delivered | failed.
    webhook_status: Mapped[str] = mapped_column(String(16), default="none")
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # What the task type last reported: {"fraction", "message", "updatedAt"};
    # progress_seq counts the reports stored (the events' ids derive from it).
    progress: Mapped[Any] = mapped_column(JSONValue, nullable=True)
    progress_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # cancelAfter as submitted (seconds), and the instant it gives.
    cancel_after: Mapped[int | None] = mapped_column(Integer, nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # webhook.events, comma-separated; None: the three final events.
    webhook_events: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # completed_at + RESULT_RETENTION_DAYS: after it the task answers 404 and
    # the retention job deletes it with its deliveries and attempts.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)


class WebhookDelivery(Base):
    """One event to deliver; its id is the ``webhook-id`` of every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # One delivery per event of a task; task.progress has one per stored report (seq).
        UniqueConstraint("task_id", "event_type", "seq", name="uq_webhook_deliveries_task_event"),
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
        # Bulk redelivery: an organization's failed deliveries since a time.
        Index("ix_webhook_deliveries_org_status_created", "organization_id", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    event_type: Mapped[str] = mapped_column(String(32))
    # task.progress: the task's progress_seq of the report it carries; 0 otherwise.
    seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[Any] = mapped_column(JSONValue)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # 5 for an event; a manual redelivery allows one attempt more.
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set while one worker is sending an attempt, so two workers never send
    # the same attempt at once.
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    outcome: Mapped[str] = mapped_column(String(32))
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(200), nullable=True)


class AuditRecord(Base):
    """One operator action taken in the console: who, what, on what, when.

    Written by the console (``app/console``) for every action that changes
    something; never updated or deleted, and kept past task retention (an
    organization's history outlives its tasks). No foreign key: a record
    names its target as it was, whatever happens to that row later.
    """

    __tablename__ = "audit_records"
    __table_args__ = (
        # An organization's page lists its latest records first.
        Index("ix_audit_records_org_id", "organization_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))  # the Basic-auth user
    action: Mapped[str] = mapped_column(String(64))  # e.g. "limits.set", "key.revoke"
    organization_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    target: Mapped[str] = mapped_column(String(200))  # the id acted on (org, key, task)
    summary: Mapped[str] = mapped_column(Text)
