"""Typed domain errors; the HTTP layer maps each to one status code."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 400
    type_slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        self.headers: dict[str, str] = {}


class ValidationFailed(ServiceError):
    status = 400
    type_slug = "validation-error"
    title = "The request is not valid"

    def __init__(self, errors: dict[str, list[str]], detail: str | None = None) -> None:
        super().__init__(detail or self.first_error(errors), errors=errors)
        self.errors = errors

    @staticmethod
    def first_error(errors: dict[str, list[str]]) -> str:
        """A detail that says what to fix: the first bad field and its first message."""
        for field, messages in errors.items():
            message = messages[0] if messages else "is not valid"
            return f"{field}: {message}"[:300]
        return "The request is not valid."


class NotFound(ServiceError):
    status = 404
    type_slug = "not-found"
    title = "Not found"


class InsufficientCredits(ServiceError):
    status = 402
    type_slug = "insufficient-credits"
    title = "Not enough credits"

    def __init__(self, balance: int, cost: int) -> None:
        super().__init__(
            f"This task costs {cost} credits and the organization's balance is {balance}.",
            balance=balance,
            cost=cost,
        )


class QueueFull(ServiceError):
    status = 429
    type_slug = "queue-full"
    title = "The organization's queue is full"

    def __init__(self, queued: int, queue_limit: int, retry_after: int = 60) -> None:
        super().__init__("", queued=queued, queueLimit=queue_limit)
        self.queued, self.queue_limit = queued, queue_limit
        self.set_retry_after(retry_after)

    def set_retry_after(self, seconds: int) -> None:
        """The estimate comes from the dispatch state in Redis, which the web layer holds."""
        self.retry_after = seconds
        self.detail = (
            f"The organization already has {self.queued} tasks waiting; its queue limit is "
            f"{self.queue_limit}. Retry after {seconds} seconds."
        )
        self.args = (self.detail,)
        self.headers["Retry-After"] = str(seconds)


class IdempotencyConflict(ServiceError):
    status = 422
    type_slug = "idempotency-key-reused"
    title = "Idempotency key already used for a different request"

    def __init__(self, key: str) -> None:
        super().__init__(
            f"The idempotency key {key!r} was already used with a different request "
            "(type, input, webhook URL or events, metadata or cancelAfter differ).",
            idempotencyKey=key,
        )


class NothingToDeliver(ServiceError):
    status = 409
    type_slug = "no-webhook-event"
    title = "The task has no webhook event to deliver yet"


class TaskAlreadyFinal(ServiceError):
    status = 409
    type_slug = "task-already-final"
    title = "The task has already finished"


def messages_to_errors(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested messages as the spec's ``{"field.path": [...]}``."""
    out: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            path = prefix if key == "_schema" else (f"{prefix}.{key}" if prefix else str(key))
            for sub, msgs in messages_to_errors(value, path).items():
                out.setdefault(sub, []).extend(msgs)
    elif isinstance(messages, list):
        for m in messages:
            if isinstance(m, str):
                out.setdefault(prefix or "body", []).append(m)
            else:
                for sub, msgs in messages_to_errors(m, prefix).items():
                    out.setdefault(sub, []).extend(msgs)
    else:
        out.setdefault(prefix or "body", []).append(str(messages))
    return out
