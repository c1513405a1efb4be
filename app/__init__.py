"""Waybill's web application: ``create_app`` wires the pieces together, nothing more."""

from __future__ import annotations

from app.container import Waybill
from app.factory import create_app

__all__ = ["Waybill", "create_app"]
