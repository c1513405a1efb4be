"""What the sync and async clients share: request bodies, paths, answer parsing. No I/O here."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from waybill_client._version import __version__
from waybill_client.errors import UnexpectedResponse
from waybill_client.models import Event, Submission, Task, TaskType
from waybill_client.retry import RetryPolicy
from waybill_client.sse import ServerSentEvent

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 3
MAX_PREFER_WAIT = 60  # docs/api.md: Prefer: wait=N, N <= 60
BATCH_MAX = 1000
# Comment lines keep an idle event stream alive at least every 15 s: a read
# that waits longer than this for a byte means the connection is gone.
STREAM_READ_TIMEOUT = 45.0
# Wait's backoff between polls that the server did not hold (Prefer: wait not applied).
POLL_FIRST_INTERVAL = 0.25
POLL_MAX_INTERVAL = 5.0


def new_idempotency_key() -> str:
    """A fresh idempotency key (uuid4), making a submission safe to retry."""
    return str(uuid.uuid4())


def task_path(task_id: str, suffix: str = "") -> str:
    if not task_id:
        raise ValueError("task_id must not be empty")
    return f"/v1/tasks/{quote(task_id, safe='')}{suffix}"


def default_headers(api_key: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    if not api_key:
        raise ValueError("api_key must not be empty")
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Accept": "application/json",
        "User-Agent": f"waybill-client-python/{__version__} httpx/{httpx.__version__}",
    }
    headers.update(extra or {})
    return headers


def timeout_of(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


def submission_body(
    type: str,
    input: Any,
    *,
    webhook: str | Mapping[str, Any] | None,
    idempotency_key: str | None,
    metadata: Mapping[str, Any] | None,
    cancel_after: int | None,
) -> dict[str, Any]:
    """The body of ``POST /v1/tasks``, with a generated ``idempotencyKey`` when none is given."""
    body = Submission(
        type=type,
        input=input,
        webhook=webhook,
        idempotency_key=idempotency_key,
        metadata=metadata,
        cancel_after=cancel_after,
    ).to_json()
    body.setdefault("idempotencyKey", new_idempotency_key())
    return body


def batch_body(items: Iterable[Submission | Mapping[str, Any]]) -> dict[str, Any]:
    """``{"tasks": [...]}``: each :class:`Submission` as its body, each mapping as given (the wire's
    camelCase names); an item without ``idempotencyKey`` gets a generated one."""
    tasks: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, Submission):
            body = item.to_json()
        elif isinstance(item, Mapping):
            body = dict(item)
        else:
            raise TypeError(f"a batch item is a Submission or a mapping, not {type(item).__name__}")
        if body.get("idempotencyKey") is None:
            body["idempotencyKey"] = new_idempotency_key()
        tasks.append(body)
    if not 1 <= len(tasks) <= BATCH_MAX:
        raise ValueError(f"a batch holds 1 to {BATCH_MAX} tasks, not {len(tasks)}")
    return {"tasks": tasks}


def list_params(
    status: str | None, type: str | None, idempotency_key: str | None, limit: int | None
) -> dict[str, str]:
    params: dict[str, str] = {}
    if status is not None:
        params["status"] = status
    if type is not None:
        params["type"] = type
    if idempotency_key is not None:
        params["idempotencyKey"] = idempotency_key
    if limit is not None:
        params["limit"] = str(limit)
    return params


def json_of(response: httpx.Response) -> Any:
    """The answer's JSON; :class:`UnexpectedResponse` when it has none."""
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        raise UnexpectedResponse(
            f"{response.request.method} {response.request.url.path} answered {response.status_code} "
            f"without JSON: {response.text[:200]!r}",
            status=response.status_code,
        ) from None


def data_of(response: httpx.Response) -> list[Any]:
    body = json_of(response)
    if not isinstance(body, Mapping) or not isinstance(body.get("data"), list):
        raise UnexpectedResponse(
            f"expected {{'data': [...]}}, got {str(body)[:200]}", status=response.status_code
        )
    return list(body["data"])


def prefer_wait_seconds(remaining: float) -> int:
    """The N of ``Prefer: wait=N`` for ``remaining`` seconds: whole seconds, at most 60 (0: do not ask).

    Rounded down, but for the first 0.1 s: ``wait(timeout=30)`` asks 30, not the 29 that
    the microseconds since the call would give.
    """
    return max(0, min(MAX_PREFER_WAIT, int(remaining + 0.1)))


def held(response: httpx.Response, asked: int, elapsed: float) -> bool:
    """Whether the server held a poll as ``Prefer: wait`` asked: it says so (``Preference-Applied``)
    and the answer did not come back suspiciously early (a server that claims it but never holds
    must not make ``wait`` spin)."""
    return asked > 0 and "wait" in response.headers.get("preference-applied", "") and elapsed >= asked / 2


def check_event_stream(response: httpx.Response) -> None:
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "text/event-stream":
        raise UnexpectedResponse(
            f"GET {response.request.url.path} answered {response.status_code} "
            f"{content_type or 'without a content type'}, "
            "not text/event-stream",
            status=response.status_code,
        )


def event_of(sse: ServerSentEvent) -> Event | None:
    """The task event an SSE event carries; None for events that are not ``task.*`` (skipped)."""
    if not sse.event.startswith("task."):
        return None
    try:
        task = Task.from_json(json.loads(sse.data))
    except (ValueError, KeyError, TypeError) as exc:
        raise UnexpectedResponse(f"event {sse.event} (id {sse.id}) does not hold a task: {exc}") from None
    return Event(id=sse.id, event=sse.event, task=task)


def stream_headers(last_event_id: str | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return headers


def stream_timeout(timeout: httpx.Timeout) -> httpx.Timeout:
    return httpx.Timeout(
        connect=timeout.connect,
        read=max(timeout.read or 0.0, STREAM_READ_TIMEOUT),
        write=timeout.write,
        pool=timeout.pool,
    )


def held_timeout(timeout: httpx.Timeout, wait_seconds: int) -> httpx.Timeout:
    """The timeout of a poll the server may hold ``wait_seconds``: the read timeout grows by as much."""
    if not wait_seconds or timeout.read is None:
        return timeout
    return httpx.Timeout(
        connect=timeout.connect, read=timeout.read + wait_seconds, write=timeout.write, pool=timeout.pool
    )


@dataclass(frozen=True)
class Page:
    tasks: list[Task]
    next_cursor: str | None


def page_of(body: Any) -> Page:
    """A page of ``GET /v1/tasks``: ``{"data": [task, ...], "nextCursor": "..." | null}``."""
    if not isinstance(body, Mapping) or not isinstance(body.get("data"), list):
        raise UnexpectedResponse(f"expected a page of tasks, got {str(body)[:200]}")
    cursor = body.get("nextCursor")
    return Page([Task.from_json(t) for t in body["data"]], str(cursor) if cursor else None)


def check_cursor(cursor: str, seen: set[str]) -> None:
    """A cursor must never come back: that would page forever."""
    if cursor in seen:
        raise UnexpectedResponse(f"the list answered the cursor {cursor!r} twice")
    seen.add(cursor)


def reconnect_delay(
    policy: RetryPolicy, failures: int, server_retry_ms: int | None, rng: random.Random | None
) -> float | None:
    """Seconds before reconnecting an event stream after ``failures`` reconnections in a row
    without a new event; None once ``policy.max_retries`` is reached. The server's ``retry:``
    (milliseconds) wins over the backoff."""
    if failures >= policy.max_retries:
        return None
    if server_retry_ms is not None:
        return server_retry_ms / 1000
    return policy.backoff(failures, rng)


def task_types_of(body: Any) -> list[TaskType]:
    if not isinstance(body, list):
        raise UnexpectedResponse(f"expected a list of task types, got {str(body)[:200]}")
    return [TaskType.from_json(t) for t in body]


def secret_of(body: Any) -> str:
    if not isinstance(body, Mapping) or not isinstance(body.get("secret"), str):
        raise UnexpectedResponse('expected {"secret": "whsec_..."}')
    return str(body["secret"])
