"""SQLAlchemy 2.x models: SQL is the source of truth for every task."""

from app.models.base import Base
from app.models.entities import (
    ApiKey,
    AuditRecord,
    CreditEntry,
    DeliveryStatus,
    Organization,
    Task,
    TaskStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookStatus,
)

__all__ = [
    "ApiKey",
    "AuditRecord",
    "Base",
    "CreditEntry",
    "DeliveryStatus",
    "Organization",
    "Task",
    "TaskStatus",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookStatus",
]
