"""gunicorn settings for ``waybill serve`` (``-c python:app.gunicorn_conf``)."""

from __future__ import annotations

from typing import Any

# SIGTERM: stop accepting, let requests in flight (a Prefer: wait holds up to
# 60 s) finish for up to graceful_timeout, then exit.
graceful_timeout = 65
# Requests are logged by the app as JSON lines (app/api/plumbing.py).
accesslog = None


def child_exit(server: Any, worker: Any) -> None:
    from app.metrics import mark_process_dead

    mark_process_dead(worker.pid)
