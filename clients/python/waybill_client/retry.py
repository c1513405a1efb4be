"""When to retry a request, and how long to wait first: pure decisions, no I/O.

Retried, at most ``max_retries`` times:

* 429 and 503 answers, after their ``Retry-After`` when they give one (unless it
  is longer than ``max_retry_after``: then the error is raised at once), else
  after a capped exponential backoff with jitter;
* errors that prove the request never reached the server (connection refused,
  connect timeout, no free connection in the pool), for every request;
* other transport errors (reset, read timeout, broken answer) only for
  requests that are safe to repeat: GETs, and submissions that carry an
  idempotency key (the clients generate one when the caller gives none).

Every other 4xx is final, as is every 5xx but 503.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

__all__ = ["RetryPolicy"]

RETRY_STATUSES = frozenset({429, 503})

# The request was never sent: repeating it cannot do anything twice.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have been received and acted upon: only an idempotent one is repeated.
_MAYBE_SENT = (
    httpx.ReadError,
    httpx.ReadTimeout,
    httpx.WriteError,
    httpx.WriteTimeout,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry decisions; ``attempt`` counts the retries already made (0 before the first retry)."""

    max_retries: int = 3
    #: The first backoff's cap in seconds; each later one doubles, up to ``backoff_max``.
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    #: A ``Retry-After`` longer than this is not waited for: the error is raised.
    max_retry_after: float = 60.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1``: "equal jitter" in
        ``[cap/2, cap]`` with ``cap = min(backoff_max, backoff_base * 2**attempt)``."""
        cap = min(self.backoff_max, self.backoff_base * (2 ** min(attempt, 30)))
        return cap / 2 + (rng or random).random() * cap / 2

    def delay_for_status(
        self, status: int, retry_after: float | None, attempt: int, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before retrying an answer with ``status``, or None to raise its error."""
        if attempt >= self.max_retries or status not in RETRY_STATUSES:
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            return max(0.0, retry_after)
        return self.backoff(attempt, rng)

    def delay_for_exception(
        self, exc: BaseException, attempt: int, *, idempotent: bool, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before retrying after a transport error, or None to raise it."""
        if attempt >= self.max_retries:
            return None
        if isinstance(exc, _NOT_SENT) or (idempotent and isinstance(exc, _MAYBE_SENT)):
            return self.backoff(attempt, rng)
        return None
