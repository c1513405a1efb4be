"""Moved to :mod:`tests.support.processes`.

Kept because ``tests/chaos/harness.py`` imports ``Process`` from here.
"""

from tests.support.processes import Process

__all__ = ["Process"]
