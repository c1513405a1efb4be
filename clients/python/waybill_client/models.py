"""Typed views of Waybill's JSON (``docs/api.md``), as frozen dataclasses.

Each ``from_json`` reads the members it knows and ignores any other, so a
newer server's additions never break an older client; ``raw`` keeps the
object as received. Times are timezone-aware :class:`datetime.datetime`
values (UTC), or None when absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "FINAL_EVENTS",
    "FINAL_STATUSES",
    "Attempt",
    "BatchItem",
    "Delivery",
    "Event",
    "Organization",
    "Problem",
    "Progress",
    "Submission",
    "Task",
    "TaskError",
    "TaskType",
    "TaskWebhook",
    "WebhookEvent",
    "parse_time",
]

#: A task in one of these statuses never changes again.
FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
#: The events that end a task's event stream.
FINAL_EVENTS = frozenset({"task.succeeded", "task.failed", "task.canceled"})


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 string (``2026-11-28T09:45:16.123Z``) as an aware datetime; None for null or absent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    return datetime.fromisoformat(value)


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class Progress:
    """What the task type last reported (1.1): ``fraction`` 0 to 1 or None, ``message`` or None."""

    fraction: float | None
    message: str | None
    updated_at: datetime | None

    @classmethod
    def from_json(cls, data: Any) -> Progress:
        d = _object(data, "progress")
        fraction = d.get("fraction")
        return cls(
            fraction=None if fraction is None else float(fraction),
            message=_opt_str(d.get("message")),
            updated_at=parse_time(d.get("updatedAt")),
        )


@dataclass(frozen=True)
class TaskError:
    """Why a task failed or was canceled: ``code`` (``canceled``, ``deadline_exceeded``...), a message."""

    code: str
    message: str | None

    @classmethod
    def from_json(cls, data: Any) -> TaskError:
        d = _object(data, "error")
        return cls(code=str(d.get("code") or ""), message=_opt_str(d.get("message")))


@dataclass(frozen=True)
class TaskWebhook:
    """The task's webhook: its URL, delivery status (``none|pending|delivered|failed``) and attempts."""

    url: str
    status: str | None
    attempts: int | None
    # (1.1) The events POSTed to the URL; empty from a server that does not say.
    events: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> TaskWebhook:
        d = _object(data, "webhook")
        events = d.get("events")
        return cls(
            url=str(d.get("url") or ""),
            status=_opt_str(d.get("status")),
            attempts=_opt_int(d.get("attempts")),
            events=tuple(str(e) for e in events) if isinstance(events, list) else (),
        )


@dataclass(frozen=True)
class Task:
    """The task representation (``docs/api.md``, "The task representation")."""

    task_id: str
    type: str
    status: str
    input: Any = None
    result: Any = None
    error: TaskError | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None
    cost: int | None = None
    webhook: TaskWebhook | None = None
    progress: Progress | None = None
    cancel_after: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_final(self) -> bool:
        """Whether the task is ``succeeded``, ``failed`` or ``canceled``."""
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, data: Any) -> Task:
        d = _object(data, "task")
        error, webhook, progress = d.get("error"), d.get("webhook"), d.get("progress")
        metadata = d.get("metadata")
        return cls(
            task_id=str(d["taskId"]),
            type=str(d["type"]),
            status=str(d["status"]),
            input=d.get("input"),
            result=d.get("result"),
            error=None if error is None else TaskError.from_json(error),
            idempotency_key=_opt_str(d.get("idempotencyKey")),
            metadata=None if metadata is None else dict(_object(metadata, "metadata")),
            cost=_opt_int(d.get("cost")),
            webhook=None if webhook is None else TaskWebhook.from_json(webhook),
            progress=None if progress is None else Progress.from_json(progress),
            cancel_after=_opt_int(d.get("cancelAfter")),
            created_at=parse_time(d.get("createdAt")),
            started_at=parse_time(d.get("startedAt")),
            completed_at=parse_time(d.get("completedAt")),
            raw=dict(d),
        )


@dataclass(frozen=True)
class Problem:
    """An ``application/problem+json`` body (RFC 9457); members other than the five standard ones
    are in ``extensions`` (``balance``, ``cost``, ``queued``, ``queueLimit``, ``idempotencyKey``...)."""

    type: str
    title: str
    status: int
    detail: str
    errors: dict[str, list[str]] | None = None
    extensions: dict[str, Any] = field(default_factory=dict)

    _STANDARD = frozenset({"type", "title", "status", "detail", "errors"})

    @classmethod
    def from_json(cls, data: Any, *, status: int | None = None) -> Problem:
        """The problem in ``data``; ``status``, the HTTP status when known, wins over the member."""
        d = data if isinstance(data, Mapping) else {}
        member = d.get("status")
        errors = d.get("errors")
        return cls(
            type=str(d.get("type") or "about:blank"),
            title=str(d.get("title") or ""),
            status=status if status is not None else (member if isinstance(member, int) else 0),
            detail=str(d.get("detail") or ""),
            errors=(
                {str(k): [str(m) for m in v] if isinstance(v, list) else [str(v)] for k, v in errors.items()}
                if isinstance(errors, Mapping)
                else None
            ),
            extensions={k: v for k, v in d.items() if k not in cls._STANDARD},
        )


@dataclass(frozen=True)
class Submission:
    """One task to submit, as :meth:`Client.submit` takes it (for :meth:`Client.submit_many`)."""

    type: str
    input: Any = None
    webhook: str | Mapping[str, Any] | None = None
    idempotency_key: str | None = None
    metadata: Mapping[str, Any] | None = None
    cancel_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The body of ``POST /v1/tasks``; members left as None are omitted."""
        body: dict[str, Any] = {"type": self.type}
        if self.input is not None:
            body["input"] = self.input
        if self.webhook is not None:
            body["webhook"] = {"url": self.webhook} if isinstance(self.webhook, str) else dict(self.webhook)
        if self.idempotency_key is not None:
            body["idempotencyKey"] = self.idempotency_key
        if self.metadata is not None:
            body["metadata"] = dict(self.metadata)
        if self.cancel_after is not None:
            body["cancelAfter"] = self.cancel_after
        return body


@dataclass(frozen=True)
class BatchItem:
    """One entry of a batch answer: ``status`` 202 (created) or 200 (idempotent replay) with ``task``,
    or a 4xx ``status`` with the ``problem`` that ``POST /v1/tasks`` would have answered."""

    status: int
    task: Task | None = None
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        """Whether the item holds a task (accepted now, or already submitted with its key)."""
        return self.task is not None

    @property
    def error(self) -> Exception | None:
        """The exception a single submission would have raised for this item (not raised), or None."""
        if self.problem is None:
            return None
        from waybill_client.errors import error_for_problem

        return error_for_problem(self.problem)

    @classmethod
    def from_json(cls, data: Any) -> BatchItem:
        d = _object(data, "batch entry")
        task, problem = d.get("task"), d.get("problem")
        status = int(d["status"])
        return cls(
            status=status,
            task=None if task is None else Task.from_json(task),
            problem=None if problem is None else Problem.from_json(problem, status=status),
        )


@dataclass(frozen=True)
class Attempt:
    """One attempt of a webhook delivery."""

    attempt: int
    at: datetime | None
    outcome: str
    response_status: int | None
    duration_ms: int | None
    error: str | None

    @classmethod
    def from_json(cls, data: Any) -> Attempt:
        d = _object(data, "attempt")
        return cls(
            attempt=int(d["attempt"]),
            at=parse_time(d.get("at")),
            outcome=str(d.get("outcome") or ""),
            response_status=_opt_int(d.get("responseStatus")),
            duration_ms=_opt_int(d.get("durationMs")),
            error=_opt_str(d.get("error")),
        )


@dataclass(frozen=True)
class Delivery:
    """One event's webhook delivery, with every attempt (``GET /v1/tasks/{taskId}/deliveries``)."""

    webhook_id: str
    event: str | None
    url: str
    status: str
    attempts: tuple[Attempt, ...]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Delivery:
        d = _object(data, "delivery")
        # docs/api.md (1.1) names the member ``event``; servers before 1.1 had none, and
        # some sent it as ``eventType``: read either, the documented name first.
        event = d.get("event", d.get("eventType"))
        return cls(
            webhook_id=str(d["webhookId"]),
            event=_opt_str(event),
            url=str(d.get("url") or ""),
            status=str(d.get("status") or ""),
            attempts=tuple(Attempt.from_json(a) for a in d.get("attempts") or ()),
            raw=dict(d),
        )


@dataclass(frozen=True)
class Organization:
    """``GET /v1/organization``."""

    id: str
    name: str
    credits: int
    queue_limit: int | None
    queued: int | None
    running: int | None
    concurrency_limit: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Organization:
        d = _object(data, "organization")
        return cls(
            id=str(d["id"]),
            name=str(d.get("name") or ""),
            credits=int(d["credits"]),
            queue_limit=_opt_int(d.get("queueLimit")),
            queued=_opt_int(d.get("queued")),
            running=_opt_int(d.get("running")),
            concurrency_limit=_opt_int(d.get("concurrencyLimit")),
            raw=dict(d),
        )


@dataclass(frozen=True)
class TaskType:
    """A registered task type (``GET /v1/task-types``)."""

    type: str
    cost: int
    description: str
    input_schema: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any) -> TaskType:
        d = _object(data, "task type")
        return cls(
            type=str(d["type"]),
            cost=int(d["cost"]),
            description=str(d.get("description") or ""),
            input_schema=dict(d.get("inputSchema") or {}),
        )


@dataclass(frozen=True)
class Event:
    """One event of a task's stream (``GET /v1/tasks/{taskId}/events``); ``task``: the task at that moment."""

    id: str | None
    event: str
    task: Task

    @property
    def is_final(self) -> bool:
        """Whether this event ends the stream (``task.succeeded``, ``task.failed``, ``task.canceled``)."""
        return self.event in FINAL_EVENTS


@dataclass(frozen=True)
class WebhookEvent:
    """A verified webhook: its ``type`` (``task.succeeded``...), ``timestamp``, task and ``webhook-id``."""

    type: str
    timestamp: datetime | None
    task: Task
    webhook_id: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
