"""Verify a Waybill webhook (Standard Webhooks signatures) and read its event.

In a Flask view::

    event = verify_webhook(request.get_data(), request.headers, secret)

``secret`` is the organization's ``whsec_...`` (``Client.webhook_secret()``).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterable
from typing import Any, Protocol

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook
from standardwebhooks.webhooks import WebhookVerificationError as _StandardVerificationError

from waybill_client.errors import WebhookVerificationError
from waybill_client.models import Task, WebhookEvent, parse_time

__all__ = ["HeaderItems", "verify_webhook"]


class HeaderItems(Protocol):
    """Headers as a mapping, or anything else with ``items()`` (werkzeug's, Flask's ``request.headers``)."""

    def items(self) -> Iterable[tuple[str, str]]: ...


def verify_webhook(body: bytes | str, headers: HeaderItems, secret: str) -> WebhookEvent:
    """The event of a webhook request whose signature ``secret`` made, checked.

    ``body`` must be the request's body exactly as received (bytes, not
    re-serialized JSON); ``headers`` any mapping holding ``webhook-id``,
    ``webhook-timestamp`` and ``webhook-signature`` (any case), such as
    Flask's ``request.headers``. Raises
    :class:`WebhookVerificationError` when a header is missing, no signature
    matches, the timestamp is more than 5 minutes away from now, or the body
    is not a Waybill event; :class:`ValueError` when ``secret`` is not a
    ``whsec_<base64>`` secret.
    """
    try:
        webhook = Webhook(secret)
    except (EmptyWebhookSecretError, binascii.Error, ValueError) as exc:
        raise ValueError(
            "the webhook secret must be whsec_<base64>, as GET /v1/webhook-secret gives it"
        ) from exc
    plain_headers = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        # json_parse=False: the body is parsed below, with Waybill's own error.
        webhook.verify(body, plain_headers, json_parse=False)
    except _StandardVerificationError as exc:
        raise WebhookVerificationError(str(exc)) from exc
    except (ValueError, UnicodeDecodeError) as exc:  # a malformed signature header or a non-UTF-8 body
        raise WebhookVerificationError(f"malformed webhook: {exc}") from exc
    return _event(body, plain_headers["webhook-id"])


def _event(body: bytes | str, webhook_id: str) -> WebhookEvent:
    try:
        payload: Any = json.loads(body)
        if not isinstance(payload, dict):
            raise TypeError("the body is not a JSON object")
        return WebhookEvent(
            type=str(payload["type"]),
            timestamp=parse_time(payload.get("timestamp")),
            task=Task.from_json(payload["data"]),
            webhook_id=webhook_id,
            raw=payload,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise WebhookVerificationError(f"the signed body is not a Waybill event: {exc}") from exc
