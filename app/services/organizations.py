"""Organizations, API keys, credit grants and webhook secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.orm import Session

from app import ids
from app.models import ApiKey, CreditEntry, Organization
from app.models.base import utcnow
from app.services.errors import NotFound, ValidationFailed

KEY_PREFIX = "wb_"
SECRET_OVERLAP = timedelta(hours=24)


def hash_key(api_key: str) -> str:
    # Keys carry 256 random bits, so one SHA-256 is enough: there is nothing
    # to brute-force that a slow hash would protect.
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class CreatedKey:
    key_id: str
    api_key: str  # shown once, never stored


@dataclass(frozen=True)
class CreatedOrganization:
    organization: Organization
    key: CreatedKey


def create_organization(
    session: Session,
    name: str,
    *,
    credits: int,
    queue_limit: int,
    concurrency_limit: int,
) -> CreatedOrganization:
    if not name.strip():
        raise ValidationFailed({"name": ["Must not be empty."]})
    if queue_limit < 0 or concurrency_limit < 1:
        raise ValidationFailed({"limits": ["queue limit >= 0 and concurrency limit >= 1"]})
    org = Organization(
        id=ids.organization_id(),
        name=name.strip(),
        credits=0,
        queue_limit=queue_limit,
        concurrency_limit=concurrency_limit,
        queued=0,
        running=0,
        webhook_secret=new_webhook_secret(),
        created_at=utcnow(),
    )
    session.add(org)
    session.flush()
    if credits:
        grant_credits(session, org.id, credits)
    key = create_api_key(session, org.id)
    return CreatedOrganization(organization=org, key=key)


def get_organization(session: Session, organization_id: str) -> Organization:
    org = session.get(Organization, organization_id)
    if org is None:
        raise NotFound(f"no organization {organization_id}")
    return org


def create_api_key(session: Session, organization_id: str) -> CreatedKey:
    get_organization(session, organization_id)
    prefix = secrets.token_hex(6)
    api_key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(
        id=ids.api_key_id(),
        organization_id=organization_id,
        prefix=prefix,
        key_hash=hash_key(api_key),
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    return CreatedKey(key_id=key.id, api_key=api_key)


def list_api_keys(session: Session, organization_id: str) -> list[ApiKey]:
    """The organization's keys, live and revoked, oldest first (only prefixes: keys are never stored)."""
    get_organization(session, organization_id)
    return list(
        session.execute(
            select(ApiKey)
            .where(ApiKey.organization_id == organization_id)
            .order_by(ApiKey.created_at, ApiKey.id)
        ).scalars()
    )


def _key_prefix(api_key: str) -> str | None:
    if not api_key.startswith(KEY_PREFIX):
        return None
    return api_key[len(KEY_PREFIX) :].split("_", 1)[0]


def find_api_key(session: Session, key_id_or_key: str) -> ApiKey:
    """The key row named by its id (``key_...``) or by the key itself (``wb_...``), revoked or not.

    A key is found as ``authenticate`` finds it: by its prefix, then its hash,
    compared in constant time. The error never repeats the key, only its prefix.
    """
    prefix = _key_prefix(key_id_or_key)
    if prefix is None:
        by_id = session.get(ApiKey, key_id_or_key)
        if by_id is None:
            raise NotFound(f"no API key {key_id_or_key}")
        return by_id
    key = session.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    expected = key.key_hash if key is not None else "0" * 64
    if not hmac.compare_digest(expected, hash_key(key_id_or_key)) or key is None:
        raise NotFound(f"no API key {KEY_PREFIX}{prefix}_... (unknown prefix, or not that key)")
    return key


def revoke_api_key(session: Session, key_id_or_key: str) -> ApiKey:
    """Revoke a key given its id or the key itself; revoking a revoked key keeps its first revocation time."""
    key = find_api_key(session, key_id_or_key)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


# Built once: on every authenticated request (app.api.plumbing.organization_id).
_API_KEYS = cast(Table, ApiKey.__table__)
_KEY_ROW = select(_API_KEYS.c.key_hash, _API_KEYS.c.organization_id, _API_KEYS.c.revoked_at).where(
    _API_KEYS.c.prefix == bindparam("p_prefix")
)


def authenticate(conn: Session | Connection, api_key: str) -> str | None:
    """The id of the organization that owns ``api_key``, or None for a missing, wrong or revoked key.

    One indexed read of the key row: it holds the organization id, and the
    foreign key guarantees the organization exists. ``conn``: a session, or
    (the API's path) a plain connection, which skips the session's own work.
    """
    prefix = _key_prefix(api_key)
    if prefix is None:
        return None
    row = conn.execute(_KEY_ROW, {"p_prefix": prefix}).first()
    # Compare in constant time even when the prefix is unknown, so timing
    # does not tell which prefixes exist.
    expected = row.key_hash if row is not None else "0" * 64
    ok = hmac.compare_digest(expected, hash_key(api_key))
    if row is None or not ok or row.revoked_at is not None:
        return None
    return str(row.organization_id)


def grant_credits(session: Session, organization_id: str, amount: int) -> int:
    """Add (or, negative, remove) credits through the ledger; returns the new balance."""
    org = get_organization(session, organization_id)
    if amount == 0:
        return org.credits
    result = session.execute(
        update(Organization)
        .where(Organization.id == organization_id, Organization.credits + amount >= 0)
        .values(credits=Organization.credits + amount)
        .returning(Organization.credits)
    ).first()
    if result is None:
        raise ValidationFailed({"amount": [f"would take the balance below zero (balance {org.credits})"]})
    session.add(
        CreditEntry(organization_id=organization_id, kind="grant", amount=amount, created_at=utcnow())
    )
    session.flush()
    session.refresh(org)
    return int(result[0])


def set_limits(
    session: Session,
    organization_id: str,
    *,
    queue_limit: int | None = None,
    concurrency_limit: int | None = None,
) -> Organization:
    # Both checked before anything changes. A negative queue limit refuses every
    # submission; a concurrency limit of 0 lets tasks be charged and queued but
    # never run: neither is a state an organization should be left in.
    errors: dict[str, list[str]] = {}
    if queue_limit is not None and queue_limit < 0:
        errors["queueLimit"] = [f"must be 0 or more (got {queue_limit})"]
    if concurrency_limit is not None and concurrency_limit < 1:
        errors["concurrencyLimit"] = [f"must be 1 or more (got {concurrency_limit})"]
    if errors:
        raise ValidationFailed(errors)
    org = get_organization(session, organization_id)
    if queue_limit is not None:
        org.queue_limit = queue_limit
    if concurrency_limit is not None:
        org.concurrency_limit = concurrency_limit
    return org


def signing_secrets(
    current: str, previous: str | None, previous_expires_at: datetime | None, *, now: datetime | None = None
) -> list[str]:
    """The secrets that sign a webhook now: the current one, and the previous one during the overlap."""
    now = now or utcnow()
    out = [current]
    if previous and previous_expires_at is not None and previous_expires_at > now:
        out.append(previous)
    return out


def rotate_webhook_secret(session: Session, organization_id: str) -> str:
    org = session.execute(
        select(Organization).where(Organization.id == organization_id).with_for_update()
    ).scalar_one()
    org.previous_webhook_secret = org.webhook_secret
    org.previous_webhook_secret_expires_at = utcnow() + SECRET_OVERLAP
    org.webhook_secret = new_webhook_secret()
    return org.webhook_secret
