"""Public identifiers: a type prefix and a ULID.

A ULID is 48 bits of milliseconds then 80 random bits: ids sort by creation
time (cursor pagination orders by id) and cannot be guessed.
"""

from __future__ import annotations

import re

from ulid import ULID

# A task id as task_id() makes it: the prefix and a lower-case Crockford ULID.
_TASK_ID = re.compile(r"task_[0-7][0-9a-hjkmnp-tv-z]{25}")  # 128 bits: the first digit is 0-7


def new_id(prefix: str) -> str:
    return f"{prefix}_{str(ULID()).lower()}"


def task_id() -> str:
    return new_id("task")


def is_task_id(value: object) -> bool:
    """Whether ``value`` could be a task id: anything else is not looked up at all."""
    return isinstance(value, str) and _TASK_ID.fullmatch(value) is not None


def organization_id() -> str:
    return new_id("org")


def api_key_id() -> str:
    return new_id("key")


def webhook_id() -> str:
    return new_id("msg")
