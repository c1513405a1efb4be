"""The version of ``waybill-client`` (also in ``pyproject.toml``)."""

__version__ = "0.1.0"
