"""The hand-written version: what a competent user writes in an afternoon instead of Waybill.

A Flask endpoint, ``POST /tasks`` (``{"input": ..., "webhookUrl": ...}``),
checks a bearer token, INSERTs one row into its own table and calls
``apply_async`` on a Celery task; the task (an echo, as Waybill's ``echo``
type: the result is the input) UPDATEs the row to ``succeeded`` with its
result and, when the row has a webhook URL, POSTs the result there with
``requests``. SQLAlchemy Core with its connection pool and plain SQL, no
ORM; Celery with its defaults (early acks, prefetch 4, no result backend, no
events); on SQLite the pragmas any multi-process SQLite app needs (WAL, a
busy timeout) and Waybill's ``synchronous=NORMAL``, so both pay the same per
commit. No retries, no credits, no fairness, no leases, no signatures: that
is the difference the benchmark prices.

It reads ``HANDWRITTEN_DATABASE_URL`` (an SQLite file or a PostgreSQL
database), ``HANDWRITTEN_BROKER_URL`` (default ``REDIS_URL``) and
``HANDWRITTEN_TOKEN`` (the bearer token; empty: none required)::

    gunicorn --workers 2 --threads 16 'bench.handwritten:create_app()'
    celery -A bench.handwritten worker --queues handwritten --concurrency 2
"""

from __future__ import annotations

import hmac
import json
import os
import uuid
from typing import Any

import requests
from celery import Celery
from flask import Flask, jsonify, request
from sqlalchemy import Engine, create_engine, event, text

QUEUE = "handwritten"
TASK = "handwritten.run"
TABLE = "handwritten_tasks"

# What is needed to tell the process apart from Waybill's, which reads DATABASE_URL.
DATABASE_ENV = "HANDWRITTEN_DATABASE_URL"
BROKER_ENV = "HANDWRITTEN_BROKER_URL"
TOKEN_ENV = "HANDWRITTEN_TOKEN"


def make_engine(url: str) -> Engine:
    """A pooled engine; bounds as Waybill's per process (5 + 11 = one per gunicorn thread)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, pool_size=5, max_overflow=11, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_size=5, max_overflow=11)


def create_table(url: str) -> None:
    """Once, before the web and the worker start."""
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {TABLE} ("
                " id VARCHAR(36) PRIMARY KEY,"
                " status VARCHAR(16) NOT NULL,"
                " input TEXT NOT NULL,"
                " result TEXT,"
                " webhook_url TEXT,"
                " created_at TIMESTAMP NOT NULL,"
                " finished_at TIMESTAMP)"
            )
        )
    engine.dispose()


celery = Celery(
    "handwritten",
    broker=os.environ.get(BROKER_ENV) or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
)
celery.conf.update(task_default_queue=QUEUE, task_ignore_result=True, broker_connection_retry_on_startup=True)

# One engine and one HTTP session per worker process, made after the fork.
_engine: Engine | None = None
_http: requests.Session | None = None


def engine() -> Engine:
    global _engine
    if _engine is None:
        _engine = make_engine(os.environ[DATABASE_ENV])
    return _engine


def http() -> requests.Session:
    global _http
    if _http is None:
        _http = requests.Session()
    return _http


@celery.task(name=TASK)
def run_task(task_id: str, task_input: Any, webhook_url: str | None) -> None:
    result = task_input  # the work: an echo, as Waybill's ``echo`` type
    with engine().begin() as conn:
        conn.execute(
            text(
                f"UPDATE {TABLE} SET status = 'succeeded', result = :result, finished_at = CURRENT_TIMESTAMP"
                " WHERE id = :id"
            ),
            {"result": json.dumps(result), "id": task_id},
        )
    if webhook_url:
        body = {
            "type": "task.succeeded",
            "data": {"taskId": task_id, "status": "succeeded", "result": result},
        }
        http().post(webhook_url, json=body, timeout=10).raise_for_status()


def create_app() -> Flask:
    """The web side, for ``gunicorn 'bench.handwritten:create_app()'``."""
    db = make_engine(os.environ[DATABASE_ENV])
    token = os.environ.get(TOKEN_ENV, "")
    app = Flask("handwritten")

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "ok"})

    @app.post("/tasks")
    def submit() -> Any:
        if token and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
            return jsonify({"error": "unauthorized"}), 401
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or "input" not in body:
            return jsonify({"error": "a JSON object with 'input' is required"}), 400
        webhook_url = body.get("webhookUrl")
        if webhook_url is not None and not isinstance(webhook_url, str):
            return jsonify({"error": "webhookUrl must be a string"}), 400
        task_id = str(uuid.uuid4())
        with db.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {TABLE} (id, status, input, webhook_url, created_at)"
                    " VALUES (:id, 'queued', :input, :webhook_url, CURRENT_TIMESTAMP)"
                ),
                {"id": task_id, "input": json.dumps(body["input"]), "webhook_url": webhook_url},
            )
        run_task.apply_async(args=[task_id, body["input"], webhook_url])
        return jsonify({"taskId": task_id, "status": "queued"}), 202

    return app
