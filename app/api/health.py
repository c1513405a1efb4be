"""Operations endpoints that need no API key."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import text

from app.api.plumbing import Unauthorized, waybill

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    wb = waybill()
    checks: dict[str, str] = {}
    try:
        with wb.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        wb.dispatcher.ping()  # on a Redis Cluster, the node holding dispatch state
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    else:
        # A warning, not a failure: Waybill works, but a Redis that may evict
        # keys can drop dispatch state (the sweep repairs it, late).
        checks["redisEviction"] = wb.dispatcher.eviction_warning() or "ok"
    ready = checks["database"] == "ok" and checks["broker"] == "ok"
    response = jsonify({"status": "ready" if ready else "unavailable", "checks": checks})
    response.status_code = 200 if ready else 503
    return response


@bp.get("/metrics")
def metrics() -> Response:
    from app.metrics import render

    wb = waybill()
    token = wb.settings.metrics_token
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("Send the metrics token as `Authorization: Bearer <METRICS_TOKEN>`.")
    # Per-organization series only to a scraper that proved it is the operator's.
    body, content_type = render(wb, show_organizations=bool(token))
    return Response(body, mimetype=None, content_type=content_type)
