"""Rotate an organization's webhook signing secret (the old one also signs for 24 h)."""

from __future__ import annotations

from app.container import Waybill
from app.services import organizations
from app.usecases.unit_of_work import UnitOfWork


def rotate(wb: Waybill, organization_id: str) -> str:
    with UnitOfWork(wb.db) as uow:
        return organizations.rotate_webhook_secret(uow.session, organization_id)
