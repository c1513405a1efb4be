"""``/v1/organization``, ``/v1/task-types`` and the webhook signing secret."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from app.api.plumbing import organization_id, read_session, waybill
from app.services import organizations
from app.usecases import webhook_secret

bp = Blueprint("organization", __name__, url_prefix="/v1")


@bp.get("/organization")
def get_organization() -> Response:
    org_id = organization_id()
    with read_session() as s:
        org = organizations.get_organization(s, org_id)
        return jsonify(
            {
                "id": org.id,
                "name": org.name,
                "credits": org.credits,
                "queueLimit": org.queue_limit,
                "queued": org.queued,
                "running": org.running,
                "concurrencyLimit": org.concurrency_limit,
            }
        )


@bp.get("/task-types")
def list_task_types() -> Response:
    organization_id()
    return jsonify(
        [
            {
                "type": t.name,
                "cost": t.cost,
                "description": t.description,
                "inputSchema": t.json_schema(),
            }
            for t in waybill().registry
        ]
    )


@bp.get("/webhook-secret")
def get_webhook_secret() -> Response:
    org_id = organization_id()
    with read_session() as s:
        return jsonify({"secret": organizations.get_organization(s, org_id).webhook_secret})


@bp.post("/webhook-secret/rotate")
def rotate_webhook_secret() -> Response:
    return jsonify({"secret": webhook_secret.rotate(waybill(), organization_id())})
