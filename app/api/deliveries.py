"""``/v1/deliveries``: webhook deliveries across an organization's tasks (bulk recovery)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from marshmallow import ValidationError

from app.api.plumbing import json_body, organization_id, waybill
from app.api.schemas import RedeliverFailedSchema
from app.services.errors import ValidationFailed, messages_to_errors
from app.usecases import redeliver

bp = Blueprint("deliveries", __name__, url_prefix="/v1/deliveries")


@bp.post("/redeliver")
def redeliver_failed() -> Response:
    """``{"since", "host"?}``: each ``failed`` delivery since then (to that host) again: 202 ``{"count"}``."""
    org_id = organization_id()
    try:
        data = RedeliverFailedSchema().load(json_body())
    except ValidationError as exc:
        raise ValidationFailed(messages_to_errors(exc.messages)) from None
    count = redeliver.redeliver_failed(waybill(), org_id, data["since"], data.get("host"))
    response = jsonify({"count": count})
    response.status_code = 202
    return response
