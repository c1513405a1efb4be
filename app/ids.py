"""Public identifiers: a type prefix and a ULID.

A ULID is 48 bits of milliseconds then 80 random bits: ids sort by creation
time (cursor pagination orders by id) and cannot be guessed.
"""

from __future__ import annotations

from ulid import ULID


def new_id(prefix: str) -> str:
    return f"{prefix}_{str(ULID()).lower()}"


def task_id() -> str:
    return new_id("task")


def organization_id() -> str:
    return new_id("org")


def api_key_id() -> str:
    return new_id("key")


def webhook_id() -> str:
    return new_id("msg")
