"""Settings for every Waybill process, read from the environment.

Nothing here imports from ``app`` or ``workers``; building a :class:`Settings`
has no side effects, so importing this package is always safe.
"""

from config.settings import Settings

__all__ = ["Settings"]
