"""One ``application/problem+json`` envelope (RFC 9457) for every error."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from app.services.errors import ServiceError

PROBLEM_BASE = "urn:waybill:problem:"
log = logging.getLogger("waybill.api")


def problem(
    status: int,
    title: str,
    detail: str,
    slug: str,
    *,
    errors: dict[str, list[str]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    body.update(extra)
    response = jsonify(body)
    response.status_code = status
    response.mimetype = "application/problem+json"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def from_service_error(exc: ServiceError) -> Response:
    extra = {k: v for k, v in exc.extra.items() if k != "errors"}
    return problem(
        exc.status,
        exc.title,
        exc.detail,
        exc.type_slug,
        errors=exc.extra.get("errors"),
        headers=exc.headers,
        **extra,
    )


_HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Missing or invalid API key"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def _count_rejection(status: int) -> None:
    from app.metrics import LIMIT_REJECTIONS, SUBMISSIONS

    outcome = {402: "rejected_402", 429: "rejected_429"}.get(status, "rejected_4xx")
    SUBMISSIONS.labels(outcome).inc()
    if status in (402, 429) and g.get("organization_id"):
        LIMIT_REJECTIONS.labels(g.organization_id, "credits" if status == 402 else "queue").inc()


def init_app(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError) -> Response:
        # Rejections are logged with the organization id, never with the key.
        log.info(
            "request rejected",
            extra={
                "event": "request.rejected",
                "organization_id": g.get("organization_id"),
                "http_status": exc.status,
                "error": exc.type_slug,
                "method": request.method,
                "path": request.path,
            },
        )
        if request.method == "POST" and request.path == "/v1/tasks":
            _count_rejection(exc.status)
        return from_service_error(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if request.method == "POST" and request.path == "/v1/tasks" and 400 <= status < 500:
            _count_rejection(status)
        slug, title = _HTTP_SLUGS.get(status, ("http-error", exc.name))
        detail = exc.description or title
        if status == 413:
            detail = f"The request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes."
        response = problem(status, title, detail, slug)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        from sqlalchemy.exc import DBAPIError, OperationalError

        if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
            log.warning(
                "database unavailable", extra={"event": "db.unavailable", "error": type(exc).__name__}
            )
            return problem(
                503,
                "Service unavailable",
                "The database is unavailable; retry shortly.",
                "unavailable",
                headers={"Retry-After": "5"},
            )
        log.exception("unhandled error", extra={"event": "http.unhandled"})
        return problem(500, "Internal server error", "An unexpected error occurred.", "internal")
