"""Celery queue and task names, in one place: the publisher, the routes and the workers use these."""

from __future__ import annotations

TASKS_QUEUE = "tasks"
WEBHOOKS_QUEUE = "webhooks"
MAINTENANCE_QUEUE = "maintenance"

RUN_TASK = "waybill.tasks.run"
DELIVER_WEBHOOK = "waybill.webhooks.deliver"
SWEEP = "waybill.maintenance.sweep"
DISPATCH_STEP = "waybill.maintenance.dispatch"
RETENTION = "waybill.maintenance.retention"
RECONCILE = "waybill.maintenance.reconcile"
