"""Exceptions: every problem+json answer (RFC 9457) becomes an :class:`ApiError` subclass.

``WaybillError``
  ``ApiError`` (the server answered an error status; carries the problem's members)
    ``BadRequest`` 400, ``Unauthorized`` 401, ``PaymentRequired`` 402 (``InsufficientCredits``),
    ``NotFound`` 404, ``Conflict`` 409, ``PayloadTooLarge`` 413, ``UnsupportedMediaType`` 415,
    ``IdempotencyConflict`` 422, ``RateLimited`` 429, ``ServerError`` 5xx (``ServiceUnavailable`` 503)
  ``NetworkError`` (no answer: connection refused, reset, timed out, after the retries)
  ``UnexpectedResponse`` (an answer that is not what the API documents)
  ``WaitTimeout`` (:meth:`Client.wait` ran out of time; the last task seen is attached)
  ``WebhookVerificationError`` (:func:`verify_webhook`: bad signature, stale timestamp)
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from waybill_client.models import Problem

if TYPE_CHECKING:
    import httpx

    from waybill_client.models import Task

__all__ = [
    "ApiError",
    "BadRequest",
    "Conflict",
    "IdempotencyConflict",
    "InsufficientCredits",
    "NetworkError",
    "NotFound",
    "PayloadTooLarge",
    "PaymentRequired",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnexpectedResponse",
    "UnsupportedMediaType",
    "WaitTimeout",
    "WaybillError",
    "WebhookVerificationError",
    "error_for_problem",
    "error_from_response",
    "parse_retry_after",
]


class WaybillError(Exception):
    """Base class of every error this client raises."""


class ApiError(WaybillError):
    """The server answered an error status.

    The problem's members are attributes: ``type``, ``title``, ``status``,
    ``detail``, ``errors`` (400: ``{"field.path": [messages]}``), and its
    extension members in ``extensions`` and as attributes in snake case:
    ``balance``, ``cost``, ``queued``, ``queue_limit`` and ``idempotency_key``
    (None when absent), any other by its name (``AttributeError`` when absent).
    ``retry_after`` is the ``Retry-After`` header in seconds, if any.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.problem = problem
        self.type = problem.type
        self.title = problem.title
        self.status = problem.status
        self.detail = problem.detail
        self.errors = problem.errors
        self.extensions = problem.extensions
        self.retry_after = retry_after
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"{self.status} {self.title}".strip()
        if self.detail:
            text += f": {self.detail}"
        return text

    # The extension members docs/api.md names; None when the problem has none.
    @property
    def balance(self) -> int | None:
        """402: the organization's credit balance."""
        return self.extensions.get("balance")

    @property
    def cost(self) -> int | None:
        """402: the task's cost in credits."""
        return self.extensions.get("cost")

    @property
    def queued(self) -> int | None:
        """429 (queue full): the organization's waiting tasks."""
        return self.extensions.get("queued")

    @property
    def queue_limit(self) -> int | None:
        """429 (queue full): the organization's queue limit."""
        return self.extensions.get("queueLimit")

    @property
    def idempotency_key(self) -> str | None:
        """422: the idempotency key that was reused."""
        return self.extensions.get("idempotencyKey")

    def __getattr__(self, name: str) -> Any:
        # Reached only for names that are not regular attributes: any other
        # extension member, by its own name or in snake case.
        if not name.startswith("_"):
            extensions = self.__dict__.get("extensions") or {}
            for key in (name, _camel(name)):
                if key in extensions:
                    return extensions[key]
        raise AttributeError(f"{type(self).__name__!s} has no attribute or problem member {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.problem, self.retry_after, self.headers))


def _rebuild(
    cls: type[ApiError], problem: Problem, retry_after: float | None, headers: dict[str, str]
) -> ApiError:
    return cls(problem, retry_after=retry_after, headers=headers)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class BadRequest(ApiError):
    """400: the request is not valid; ``errors`` names each bad field."""


class Unauthorized(ApiError):
    """401: the API key is missing, unknown or revoked."""


class PaymentRequired(ApiError):
    """402."""


class InsufficientCredits(PaymentRequired):
    """402: the organization's ``balance`` is below the task's ``cost``."""


class NotFound(ApiError):
    """404: no such task for this organization (another's task is indistinguishable from none)."""


class Conflict(ApiError):
    """409: e.g. canceling a task that is already final."""


class PayloadTooLarge(ApiError):
    """413: the body is over the server's size limit."""


class UnsupportedMediaType(ApiError):
    """415: the body is not JSON."""


class IdempotencyConflict(ApiError):
    """422: the idempotency key was already used for a different request."""


class RateLimited(ApiError):
    """429: the queue is full, or too many failed authentications; see ``retry_after``."""


class ServerError(ApiError):
    """5xx."""


class ServiceUnavailable(ServerError):
    """503: e.g. the database is unavailable; see ``retry_after``."""


class NetworkError(WaybillError):
    """No answer from the server (after the retries); the httpx error is ``__cause__``."""


class UnexpectedResponse(WaybillError):
    """An answer the API does not document (not JSON, wrong content type...)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WaitTimeout(WaybillError):
    """:meth:`Client.wait` reached its timeout before the task was final; ``task`` is the last one seen."""

    def __init__(self, task_id: str, timeout: float, task: Task | None) -> None:
        status = task.status if task is not None else "unknown"
        super().__init__(f"task {task_id} is not final after {timeout:g} s (status {status})")
        self.task_id = task_id
        self.timeout = timeout
        self.task = task


class WebhookVerificationError(WaybillError):
    """A webhook's signature does not match, its timestamp is too old or too new, or it is malformed."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    402: InsufficientCredits,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: IdempotencyConflict,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_class(status: int) -> type[ApiError]:
    """The exception class for an HTTP error status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return ApiError


def error_for_problem(
    problem: Problem, *, retry_after: float | None = None, headers: Mapping[str, str] | None = None
) -> ApiError:
    """The exception (not raised) for ``problem``, by its ``status``."""
    return error_class(problem.status)(problem, retry_after=retry_after, headers=headers)


_DELTA = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*$")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds from now: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    match = _DELTA.match(value)
    if match:
        return float(match.group(1))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_from_response(response: httpx.Response) -> ApiError:
    """The exception for an error answer: its problem+json, or a problem made from the status line."""
    problem_json: Any = None
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("application/problem+json", "application/json"):
        try:
            problem_json = response.json()
        except ValueError:
            problem_json = None
    if isinstance(problem_json, Mapping):
        problem = Problem.from_json(problem_json, status=response.status_code)
    else:
        problem = Problem(
            type="about:blank",
            title=response.reason_phrase or "",
            status=response.status_code,
            detail=response.text[:500] if response.text else "",
        )
    return error_for_problem(
        problem, retry_after=parse_retry_after(response.headers.get("retry-after")), headers=response.headers
    )
