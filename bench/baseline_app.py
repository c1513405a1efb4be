"""The baselines Waybill is measured against: a bare Flask endpoint and a raw Celery no-op.

``POST /baseline/tasks`` does the least a task queue's submit can do: insert
one row with SQLAlchemy and call ``apply_async`` on a no-op Celery task. No
authentication, no validation, no credits, no dispatch. It runs under gunicorn
with the same flags as ``waybill serve`` (minus Waybill's own config file), in
the same database (its own table) and on the same Redis (its own queue,
``bench``), so the ratio Waybill/baseline is the cost of what Waybill adds.

Its Celery app takes every worker setting from Waybill's own configuration
(late acks, prefetch 1, events, visibility timeout...), so the raw Celery
figures differ from Waybill's only by what Waybill does around a task.

    gunicorn 'bench.baseline_app:create_app()'      # the web baseline
    celery -A bench.baseline_app worker -Q bench     # the worker baseline
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from flask import Flask, jsonify, request
from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, insert

from app.celery_app import celery_config
from app.db import Database, make_engine
from config import Settings

QUEUE = "bench"
NOOP = "bench.noop"
ROUNDTRIP = "bench.roundtrip"

# Worker-side settings copied from Waybill's Celery configuration; routes,
# beat and the task modules are Waybill's own and stay out.
WORKER_SETTINGS = (
    "broker_connection_retry_on_startup",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "worker_prefetch_multiplier",
    "broker_transport_options",
    "task_ignore_result",
    "task_publish_retry_policy",
    "worker_send_task_events",
    "task_send_sent_event",
    "worker_hijack_root_logger",
)

metadata = MetaData()
rows = Table(
    "bench_baseline_rows",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("body", JSON),
    Column("created_at", DateTime(timezone=True)),
)


def create_table(database_url: str) -> None:
    """Create the baseline's table once, before any gunicorn worker starts (no create race)."""
    engine = make_engine(database_url)
    metadata.create_all(engine)
    engine.dispose()


def make_celery(redis_url: str) -> Celery:
    waybill = celery_config(Settings.from_env(redis_url=redis_url))
    conf: dict[str, Any] = {k: waybill[k] for k in WORKER_SETTINGS if k in waybill}
    conf.update(
        broker_url=redis_url,
        # Only the round-trip task stores a result (that is what a round trip
        # waits for); the no-op ignores it like every Waybill task.
        result_backend=redis_url,
        task_default_queue=QUEUE,
    )
    app = Celery("baseline")
    app.conf.update(conf)
    return app


celery = make_celery(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")


@celery.task(name=NOOP)
def noop(*_args: Any) -> None:
    return None


@celery.task(name=ROUNDTRIP, ignore_result=False)
def roundtrip(value: Any) -> Any:
    return value


def create_app() -> Flask:
    """The bare endpoint, for ``gunicorn 'bench.baseline_app:create_app()'``."""
    # app.db's engine setup: the same SQLite pragmas (WAL, busy timeout) and
    # PostgreSQL pool as Waybill, so the baseline pays the same per-commit cost.
    db = Database(os.environ["DATABASE_URL"])
    flask_app = Flask("baseline")

    @flask_app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "ok"})

    @flask_app.post("/baseline/tasks")
    def submit() -> Any:
        task_id = uuid.uuid4().hex
        with db.session() as s:
            s.execute(insert(rows).values(id=task_id, body=request.get_json(), created_at=datetime.now(UTC)))
        noop.apply_async(args=[task_id], queue=QUEUE)
        response = jsonify({"taskId": task_id, "status": "queued"})
        response.status_code = 202
        return response

    return flask_app
