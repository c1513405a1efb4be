"""The console's pages and actions (``/console/``); ``docs/operations.rst`` describes them.

Reads go through ``app.console.reads`` and the services; every action goes
through the use case or service the API and the CLI use, and writes one
audit record. An action answers with a redirect to the page it came from
(``?notice=`` names a fixed message, never text from the request), except
a new API key, shown once on the page the POST answers with.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import redis
from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

from app.console import audit, reads, workers
from app.console.auth import REALM, authenticated_user, csrf_problem, csrf_token
from app.container import Waybill, current
from app.models import TaskStatus
from app.services import deliveries, organizations
from app.services.errors import NotFound, ServiceError, ValidationFailed
from app.services.representation import iso
from app.services.task_events import events_of
from app.usecases import cancel as cancel_usecase
from app.usecases import redeliver as redeliver_usecase
from app.usecases.unit_of_work import UnitOfWork

log = logging.getLogger("waybill.console")

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

DRAIN_WINDOW = timedelta(minutes=5)
FAILED_WINDOW = timedelta(hours=1)
PAYLOAD_SHOWN_BYTES = 10 * 1024
# Fixed messages a redirect may name; the request never supplies the text.
NOTICES = {
    "limits-saved": "Limits saved.",
    "limits-saved-redis-later": (
        "Limits saved. Redis was not reachable: the dispatcher takes the new concurrency limit "
        "at the organization's next submission."
    ),
    "credits-granted": "Credits granted through the ledger.",
    "key-revoked": "API key revoked: requests with it now answer 401.",
    "secret-rotated": "Webhook secret rotated: the previous one also signs for 24 hours.",
    "task-canceled": "Task canceled and refunded.",
    "task-redelivered": "The task's webhook events are being delivered again.",
    "bulk-redelivered": "Failed deliveries queued again",
}
SECURITY_HEADERS = {
    # Pages show keys and credits: never cached, never framed, no script at all.
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"
    ),
}


# Access: credentials on every request, CSRF on every POST


@bp.before_request
def _guard() -> Response | None:
    credentials = current_app.extensions.get("waybill.console")
    if credentials is None:
        return _page(
            "error.html",
            503,
            title="Console closed",
            message="The console is closed: CONSOLE_BASIC_AUTH=user:password is not set "
            "(docs/operations.rst).",
        )
    user = authenticated_user(request, credentials)
    if user is None:
        response = Response("Operator credentials required.\n", 401, mimetype="text/plain")
        response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
        return response
    g.console_user = user
    g.console_csrf = csrf_token(credentials, user)
    if request.method not in ("GET", "HEAD"):
        problem = csrf_problem(request, credentials, user)
        if problem is not None:
            log.warning(
                "console form refused",
                extra={"event": "console.csrf_refused", "path": request.path, "error": problem},
            )
            return _page("error.html", 403, title="Form refused", message=problem)
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@bp.errorhandler(ServiceError)
def _service_error(exc: ServiceError) -> Response:
    return _page("error.html", exc.status, title=exc.title, message=exc.detail)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return _page("error.html", exc.code or 500, title=exc.name, message=exc.description or exc.name)


@bp.app_template_filter("when")
def _when(value: datetime | None) -> str:
    return iso(value) or "—"


@bp.context_processor
def _context() -> dict[str, Any]:
    return {
        "console_user": g.get("console_user"),
        "csrf_token": g.get("console_csrf", ""),
        "notice": _notice(),
    }


def _notice() -> str | None:
    text = NOTICES.get(request.args.get("notice", ""))
    count = request.args.get("count", "")
    if text and count.isdigit():
        text = f"{text}: {int(count)}."
    return text


def _page(template: str, status: int = 200, **context: Any) -> Response:
    return Response(render_template(f"console/{template}", **context), status, mimetype="text/html")


def _back(endpoint: str, notice: str, **values: Any) -> WerkzeugResponse:
    count = values.pop("count", None)
    query = {"notice": notice, **({"count": count} if count is not None else {})}
    return redirect(f"{url_for(endpoint, **values)}?{urlencode(query)}", 303)


def _actor() -> str:
    user: str = g.console_user
    return user


# Overview


@bp.get("/")
def overview() -> Response:
    wb = current()
    with wb.db.read_session() as s:
        loads = reads.busiest_organizations(
            s,
            drain_window=DRAIN_WINDOW,
            failed_window=FAILED_WINDOW,
            retention_days=wb.settings.result_retention_days,
        )
        organization_count = reads.organization_count(s)
    return _page(
        "overview.html",
        loads=loads,
        organization_count=organization_count,
        drain_minutes=int(DRAIN_WINDOW.total_seconds() // 60),
        circuits=_circuits(wb),
        workers=workers.seen(current_app.extensions["celery"]),
        flower_url=_flower_url(wb),
    )


def _circuits(wb: Waybill) -> list[dict[str, Any]] | None:
    """Open webhook circuits (hosts whose deliveries are paused), or None when unknown."""
    try:
        # Imported here: the circuit breaker is a separate piece of work, and
        # the console must render (showing n/a) wherever it is not there yet.
        from app.services.circuits import snapshot
    except ImportError:
        return None
    try:
        return [c for c in snapshot(wb.redis) if c.get("state") != "closed"]
    except (redis.RedisError, RuntimeError) as exc:
        log.warning("circuits unavailable", extra={"event": "console.circuits", "error": type(exc).__name__})
        return None


def _flower_url(wb: Waybill) -> str:
    host = wb.settings.http_host
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: the host this page was reached by
        host = request.host.rsplit(":", 1)[0] if not request.host.startswith("[") else request.host
    return f"http://{host}:{wb.settings.flower_port}/"


# Organization


@bp.get("/organizations")
def organization_lookup() -> WerkzeugResponse:
    """The overview's "organization id" form (a GET form cannot put its value in the path)."""
    org_id = request.args.get("org", "").strip()
    if not org_id:
        raise NotFound("Give an organization id.")
    return redirect(url_for("console.organization", org_id=org_id), 303)


@bp.get("/organizations/<org_id>")
def organization(org_id: str) -> Response:
    return _organization_page(org_id)


def _organization_page(org_id: str, status: int = 200, **extra: Any) -> Response:
    wb = current()
    before = request.args.get("ledger_before", "")
    with wb.db.read_session() as s:
        org = organizations.get_organization(s, org_id)
        keys = organizations.list_api_keys(s, org_id)
        ledger, ledger_next = reads.ledger_page(s, org_id, before=int(before) if before.isdigit() else None)
        records = audit.latest(s, org_id)
    return _page(
        "organization.html",
        status,
        org=org,
        keys=keys,
        key_prefix=organizations.KEY_PREFIX,
        ledger=ledger,
        ledger_next=ledger_next,
        records=records,
        errors=extra.pop("errors", {}),
        form=extra.pop("form", {}),
    )


def _int_field(name: str, label: str, errors: dict[str, list[str]], *, required: bool) -> int | None:
    text = request.form.get(name, "").strip()
    if not text:
        if required:
            errors[label] = ["is required"]
        return None
    try:
        return int(text)
    except ValueError:
        errors[label] = [f"must be a whole number (got {text[:40]!r})"]
        return None


@bp.post("/organizations/<org_id>/limits")
def set_limits(org_id: str) -> Response | WerkzeugResponse:
    wb = current()
    errors: dict[str, list[str]] = {}
    queue_limit = _int_field("queue_limit", "queueLimit", errors, required=False)
    concurrency_limit = _int_field("concurrency_limit", "concurrencyLimit", errors, required=False)
    if not errors and queue_limit is None and concurrency_limit is None:
        errors["limits"] = ["give a queue limit, a concurrency limit, or both"]
    try:
        if errors:
            raise ValidationFailed(errors)
        with wb.db.session() as s:
            before = organizations.get_organization(s, org_id)
            was = (before.queue_limit, before.concurrency_limit)
            # The same service and bounds as `waybill org limits`.
            org = organizations.set_limits(
                s, org_id, queue_limit=queue_limit, concurrency_limit=concurrency_limit
            )
            audit.record(
                s,
                actor=_actor(),
                action="limits.set",
                target=org_id,
                organization_id=org_id,
                summary=(
                    f"queue limit {was[0]} -> {org.queue_limit}; "
                    f"concurrency limit {was[1]} -> {org.concurrency_limit}"
                ),
            )
    except ValidationFailed as exc:
        return _organization_page(org_id, 400, errors=exc.errors, form=request.form)
    notice = "limits-saved"
    if concurrency_limit is not None:
        # As the CLI: the dispatcher reads concurrency limits from Redis; SQL stays the record.
        try:
            wb.dispatcher.set_concurrency_limit(org_id, concurrency_limit)
        except (redis.RedisError, RuntimeError):
            notice = "limits-saved-redis-later"
    return _back("console.organization", notice, org_id=org_id)


@bp.post("/organizations/<org_id>/credits")
def grant_credits(org_id: str) -> Response | WerkzeugResponse:
    wb = current()
    errors: dict[str, list[str]] = {}
    amount = _int_field("amount", "amount", errors, required=True)
    if amount == 0:
        errors["amount"] = ["must not be 0"]
    note = request.form.get("note", "").strip()[:200]
    try:
        if errors or amount is None:
            raise ValidationFailed(errors)
        with wb.db.session() as s:
            balance = organizations.grant_credits(s, org_id, amount)
            audit.record(
                s,
                actor=_actor(),
                action="credits.grant",
                target=org_id,
                organization_id=org_id,
                summary=f"{amount:+d} credits, balance {balance}" + (f"; note: {note}" if note else ""),
            )
    except ValidationFailed as exc:
        return _organization_page(org_id, 400, errors=exc.errors, form=request.form)
    return _back("console.organization", "credits-granted", org_id=org_id)


@bp.post("/organizations/<org_id>/keys")
def create_key(org_id: str) -> Response:
    wb = current()
    with wb.db.session() as s:
        key = organizations.create_api_key(s, org_id)
        audit.record(
            s,
            actor=_actor(),
            action="key.create",
            target=key.key_id,
            organization_id=org_id,
            summary=f"new API key {key.key_id}",
        )
    # Shown on this answer only: only the key's hash is stored.
    return _page("key_created.html", org_id=org_id, key=key)


@bp.post("/organizations/<org_id>/keys/<key_id>/revoke")
def revoke_key(org_id: str, key_id: str) -> WerkzeugResponse:
    wb = current()
    with wb.db.session() as s:
        key = organizations.find_api_key(s, key_id)
        if key.organization_id != org_id:
            raise NotFound(f"no API key {key_id} in organization {org_id}")
        already = key.revoked_at is not None
        organizations.revoke_api_key(s, key_id)
        audit.record(
            s,
            actor=_actor(),
            action="key.revoke",
            target=key_id,
            organization_id=org_id,
            summary=f"API key {key_id} " + ("was already revoked" if already else "revoked"),
        )
    return _back("console.organization", "key-revoked", org_id=org_id)


@bp.post("/organizations/<org_id>/webhook-secret/rotate")
def rotate_secret(org_id: str) -> WerkzeugResponse:
    wb = current()
    # The service of app.usecases.webhook_secret.rotate, in one transaction
    # with its audit record; the new secret is not shown (GET /v1/webhook-secret).
    with UnitOfWork(wb.db) as uow:
        organizations.get_organization(uow.session, org_id)
        organizations.rotate_webhook_secret(uow.session, org_id)
        audit.record(
            uow.session,
            actor=_actor(),
            action="webhook_secret.rotate",
            target=org_id,
            organization_id=org_id,
            summary="webhook signing secret rotated; the previous one signs for 24 h",
        )
    return _back("console.organization", "secret-rotated", org_id=org_id)


# Tasks


def _datetime_arg(source: Any, name: str, errors: dict[str, str]) -> datetime | None:
    """A ``datetime-local`` field (``2026-01-31T12:00``) or RFC 3339 text; naive means UTC."""
    text = (source.get(name) or "").strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        errors[name] = "not a date and time (YYYY-MM-DDTHH:MM, UTC)"
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@bp.get("/tasks")
def tasks() -> Response:
    wb = current()
    args = request.args
    errors: dict[str, str] = {}
    search = reads.TaskSearch(
        task_id=args.get("task_id", "").strip(),
        organization_id=args.get("organization_id", "").strip(),
        idempotency_key=args.get("idempotency_key", "").strip(),
        status=args.get("status", "").strip(),
        type=args.get("type", "").strip(),
        created_from=_datetime_arg(args, "created_from", errors),
        created_to=_datetime_arg(args, "created_to", errors),
        before=args.get("before", "").strip(),
    )
    errors.update(search.problems())
    found: list[Any] = []
    next_before = None
    if not errors:  # no filter at all: the latest tasks of every organization
        with wb.db.read_session() as s:
            found, next_before = reads.search_tasks(s, search)
    next_url = None
    if next_before:
        query = {**args.to_dict(), "before": next_before}
        next_url = f"{url_for('console.tasks')}?{urlencode(query)}"
    return _page(
        "tasks.html",
        400 if errors else 200,
        tasks=found,
        errors=errors,
        args=args,
        statuses=[s.value for s in TaskStatus],
        next_url=next_url,
    )


def _shown(value: Any) -> tuple[str, bool]:
    """A task's input or result as indented JSON, cut at PAYLOAD_SHOWN_BYTES; (text, cut)."""
    if value is None:
        return "null", False
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
    data = text.encode()
    if len(data) <= PAYLOAD_SHOWN_BYTES:
        return text, False
    return data[:PAYLOAD_SHOWN_BYTES].decode(errors="ignore"), True


@bp.get("/tasks/<task_id>")
def task(task_id: str) -> Response:
    wb = current()
    with wb.db.read_session() as s:
        found = reads.find_task(s, task_id)
        if found is None:
            raise NotFound(f"No task {task_id} (never existed, or past its retention).")
        events = events_of(found)
        attempts = deliveries.list_for_task(s, found.id)
        org = organizations.get_organization(s, found.organization_id)
    input_text, input_cut = _shown(found.input)
    result_text, result_cut = _shown(found.result)
    return _page(
        "task.html",
        task=found,
        org=org,
        events=events,
        deliveries=attempts,
        input_text=input_text,
        input_cut=input_cut,
        result_text=result_text,
        result_cut=result_cut,
        shown_kib=PAYLOAD_SHOWN_BYTES // 1024,
        final=TaskStatus(found.status).is_final,
    )


def _task_or_404(wb: Waybill, task_id: str) -> tuple[str, str]:
    with wb.db.read_session() as s:
        found = reads.find_task(s, task_id)
        if found is None:
            raise NotFound(f"No task {task_id} (never existed, or past its retention).")
        return found.id, found.organization_id


@bp.post("/tasks/<task_id>/cancel")
def cancel_task(task_id: str) -> WerkzeugResponse:
    wb = current()
    task_id, org_id = _task_or_404(wb, task_id)
    done = cancel_usecase.cancel(wb, org_id, task_id)  # as POST /v1/tasks/{id}/cancel: 409 once final
    audit.record_after(
        wb.db,
        actor=_actor(),
        action="task.cancel",
        target=task_id,
        organization_id=org_id,
        summary=f"task {task_id} canceled (cost {done['cost']} refunded)",
    )
    return _back("console.task", "task-canceled", task_id=task_id)


@bp.post("/tasks/<task_id>/redeliver")
def redeliver_task(task_id: str) -> WerkzeugResponse:
    wb = current()
    task_id, org_id = _task_or_404(wb, task_id)
    listed = redeliver_usecase.redeliver(wb, org_id, task_id)  # 409 when it has no event
    audit.record_after(
        wb.db,
        actor=_actor(),
        action="task.redeliver",
        target=task_id,
        organization_id=org_id,
        summary=f"{len(listed)} webhook event(s) of task {task_id} delivered again",
    )
    return _back("console.task", "task-redelivered", task_id=task_id)


# Deliveries


@bp.get("/deliveries")
def deliveries_page() -> Response:
    return _deliveries_page()


def _deliveries_page(status: int = 200, **extra: Any) -> Response:
    wb = current()
    retry_span = timedelta(seconds=wb.settings.webhook_retry_base_seconds * 16)  # 1+2+4+8 bases, and jitter
    with wb.db.read_session() as s:
        hosts, capped = reads.failing_hosts(s, window=FAILED_WINDOW, retry_span=retry_span)
    return _page(
        "deliveries.html",
        status,
        hosts=hosts,
        capped=capped,
        row_cap=reads.FAILING_HOST_ROWS,
        circuits=_circuits(wb),
        errors=extra.get("errors", {}),
        form=extra.get("form", {}),
        default_since=(datetime.now(UTC) - FAILED_WINDOW).strftime("%Y-%m-%dT%H:%M"),
    )


@bp.post("/deliveries/redeliver")
def bulk_redeliver() -> Response | WerkzeugResponse:
    wb = current()
    errors: dict[str, str] = {}
    org_id = request.form.get("organization_id", "").strip()
    host = request.form.get("host", "").strip() or None
    since = _datetime_arg(request.form, "since", errors)
    if since is None and "since" not in errors:
        errors["since"] = "is required"
    if not org_id:
        errors["organization_id"] = "is required"
    if not errors:
        with wb.db.read_session() as s:
            try:
                organizations.get_organization(s, org_id)
            except NotFound:
                errors["organization_id"] = "no such organization"
    if errors or since is None:
        return _deliveries_page(400, errors=errors, form=request.form)
    # As POST /v1/deliveries/redeliver and `waybill deliveries redeliver`.
    count = redeliver_usecase.redeliver_failed(wb, org_id, since, host)
    audit.record_after(
        wb.db,
        actor=_actor(),
        action="deliveries.redeliver_failed",
        target=org_id,
        organization_id=org_id,
        summary=f"{count} failed deliveries since {iso(since)} to {host or 'any host'} queued again",
    )
    return _back("console.deliveries_page", "bulk-redelivered", count=count)
