"""The synchronous client: :class:`Client`."""

from __future__ import annotations

import builtins
import random
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any

import httpx

from waybill_client import _core
from waybill_client.errors import NetworkError, WaitTimeout, error_from_response
from waybill_client.models import (
    BatchItem,
    Delivery,
    Event,
    Organization,
    Submission,
    Task,
    TaskType,
)
from waybill_client.retry import RetryPolicy
from waybill_client.sse import SSEParser

__all__ = ["Client"]


class Client:
    """A client of one organization's Waybill API (``docs/api.md``), on :class:`httpx.Client`.

    ``with Client("https://waybill.example.com", "wb_...") as wb:``
    ``task = wb.wait(wb.submit("echo", {"hello": "world"}).task_id)``

    ``timeout`` is each request's (seconds, or an :class:`httpx.Timeout`);
    ``max_retries`` bounds the automatic retries of one call (see
    :mod:`waybill_client.retry`), or pass a whole ``retry_policy``.
    ``transport``, ``sleep`` and ``rng`` replace httpx's transport,
    :func:`time.sleep` and the jitter's random source (tests).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = _core.DEFAULT_TIMEOUT,
        max_retries: int = _core.DEFAULT_MAX_RETRIES,
        retry_policy: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.retry_policy = retry_policy or RetryPolicy(max_retries=max_retries)
        self._timeout = _core.timeout_of(timeout)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=_core.default_headers(api_key, headers),
            timeout=self._timeout,
            transport=transport,
            follow_redirects=False,
        )
        self._sleep = sleep or time.sleep
        self._rng = rng

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    # -- tasks -------------------------------------------------------------

    def submit(
        self,
        type: str,
        input: Any = None,
        *,
        webhook: str | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        cancel_after: int | None = None,
    ) -> Task:
        """``POST /v1/tasks``: the new task (``queued``), or the existing one for a reused key.

        ``webhook`` is a URL or ``{"url": ..., "events": [...]}``; ``cancel_after``
        is seconds after submission at which an unfinished task is canceled.
        Without ``idempotency_key`` a fresh one is generated, so that a retry
        after a lost answer never submits twice.
        """
        body = _core.submission_body(
            type,
            input,
            webhook=webhook,
            idempotency_key=idempotency_key,
            metadata=metadata,
            cancel_after=cancel_after,
        )
        return Task.from_json(_core.json_of(self._send("POST", "/v1/tasks", json=body, idempotent=True)))

    def submit_many(self, items: Iterable[Submission | Mapping[str, Any]]) -> builtins.list[BatchItem]:
        """``POST /v1/tasks/batch``: one :class:`BatchItem` per item, in order.

        Each item is a :class:`Submission` or a mapping shaped as the body of
        ``POST /v1/tasks`` (camelCase: ``idempotencyKey``, ``cancelAfter``).
        Items without an idempotency key get a generated one. A refused item
        is an entry with its ``problem``, not an exception; only a refused
        batch (400, 413, 415...) raises.
        """
        body = _core.batch_body(items)
        data = _core.data_of(self._send("POST", "/v1/tasks/batch", json=body, idempotent=True))
        return [BatchItem.from_json(entry) for entry in data]

    def get(self, task_id: str) -> Task:
        """``GET /v1/tasks/{taskId}``."""
        return Task.from_json(_core.json_of(self._send("GET", _core.task_path(task_id), idempotent=True)))

    def wait(self, task_id: str, timeout: float = 300.0) -> Task:
        """The task once it is final (``succeeded``, ``failed``, ``canceled``).

        Long-polls ``GET /v1/tasks/{taskId}`` with ``Prefer: wait=N`` (N at most
        60 and never past ``timeout``), again and again; when the server answers
        without holding the request, waits between polls, longer each time (up
        to 5 s). Raises :class:`WaitTimeout` (with the last task seen) once
        ``timeout`` seconds have passed.
        """
        if timeout < 0:
            raise ValueError("timeout must not be negative")
        path = _core.task_path(task_id)
        deadline = time.monotonic() + timeout
        interval = _core.POLL_FIRST_INTERVAL
        while True:
            asked = _core.prefer_wait_seconds(deadline - time.monotonic())
            started = time.monotonic()
            response = self._send(
                "GET",
                path,
                headers={"Prefer": f"wait={asked}"} if asked else None,
                timeout=self._held_timeout(asked),
                idempotent=True,
            )
            elapsed = time.monotonic() - started
            task = Task.from_json(_core.json_of(response))
            if task.is_final:
                return task
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(task_id, timeout, task)
            if not _core.held(response, asked, elapsed):
                self._sleep(min(interval, remaining))
                interval = min(interval * 2, _core.POLL_MAX_INTERVAL)

    def cancel(self, task_id: str) -> Task:
        """``POST /v1/tasks/{taskId}/cancel``: the task, now ``canceled``.

        :class:`Conflict` if the task is already final. Not repeated after an
        error that may have reached the server (a second cancel would be 409).
        """
        response = self._send("POST", _core.task_path(task_id, "/cancel"), idempotent=False)
        return Task.from_json(_core.json_of(response))

    def list(
        self,
        status: str | None = None,
        type: str | None = None,
        idempotency_key: str | None = None,
        limit: int | None = None,
    ) -> Generator[Task, None, None]:
        """Every task matching the filters, newest first, page after page (``limit``: page size, 1 to 100).

        The pages are fetched as the iteration reaches them (``nextCursor``).
        """
        params = _core.list_params(status, type, idempotency_key, limit)
        seen: set[str] = set()
        while True:
            body = _core.json_of(self._send("GET", "/v1/tasks", params=params, idempotent=True))
            page = _core.page_of(body)
            yield from page.tasks
            if page.next_cursor is None:
                return
            _core.check_cursor(page.next_cursor, seen)
            params["cursor"] = page.next_cursor

    def events(self, task_id: str, *, last_event_id: str | None = None) -> Generator[Event, None, None]:
        """The task's events (``GET /v1/tasks/{taskId}/events``), ending after the final one.

        Events already sent are replayed first (after ``last_event_id`` when
        given). When the connection drops before the final event, reconnects
        with ``Last-Event-ID`` and goes on (at most ``max_retries`` times in a
        row without a new event; the server's ``retry:`` sets the delay).
        """
        path = _core.task_path(task_id, "/events")
        failures = 0
        while True:
            parser = SSEParser()
            cause: Exception | None = None
            progressed = False
            try:
                response = self._send(
                    "GET",
                    path,
                    headers=_core.stream_headers(last_event_id),
                    timeout=_core.stream_timeout(self._timeout),
                    idempotent=True,
                    stream=True,
                )
                try:
                    _core.check_event_stream(response)
                    for chunk in response.iter_bytes():
                        for sse in parser.feed(chunk):
                            last_event_id = sse.id if sse.id is not None else last_event_id
                            event = _core.event_of(sse)
                            if event is None:
                                continue
                            progressed = True
                            yield event
                            if event.is_final:
                                return
                finally:
                    response.close()
            except httpx.TransportError as exc:
                cause = exc
            failures = 0 if progressed else failures
            delay = _core.reconnect_delay(self.retry_policy, failures, parser.retry, self._rng)
            if delay is None:
                raise NetworkError(
                    f"the event stream of task {task_id} ended before its final event"
                ) from cause
            failures += 1
            self._sleep(delay)

    def deliveries(self, task_id: str) -> builtins.list[Delivery]:
        """``GET /v1/tasks/{taskId}/deliveries``: every webhook event of the task, with every attempt."""
        response = self._send("GET", _core.task_path(task_id, "/deliveries"), idempotent=True)
        return [Delivery.from_json(d) for d in _core.data_of(response)]

    # -- the organization --------------------------------------------------

    def organization(self) -> Organization:
        """``GET /v1/organization``: credits, limits and counters."""
        return Organization.from_json(_core.json_of(self._send("GET", "/v1/organization", idempotent=True)))

    def task_types(self) -> builtins.list[TaskType]:
        """``GET /v1/task-types``."""
        return _core.task_types_of(_core.json_of(self._send("GET", "/v1/task-types", idempotent=True)))

    def webhook_secret(self) -> str:
        """``GET /v1/webhook-secret``: the organization's signing secret (``whsec_...``)."""
        return _core.secret_of(_core.json_of(self._send("GET", "/v1/webhook-secret", idempotent=True)))

    # -- transport ---------------------------------------------------------

    def _held_timeout(self, wait_seconds: int) -> httpx.Timeout:
        return _core.held_timeout(self._timeout, wait_seconds)

    def _send(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One call, retried per :attr:`retry_policy`; returns a 2xx/3xx answer, raises the rest.

        ``idempotent``: whether the request may be repeated after a transport
        error that happened once it may have reached the server.
        """
        attempt = 0
        while True:
            request = self._http.build_request(
                method,
                path,
                json=json,
                params=params,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
            delay: float | None
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry_policy.delay_for_exception(
                    exc, attempt, idempotent=idempotent, rng=self._rng
                )
                if delay is None:
                    raise NetworkError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response
                try:
                    if stream:
                        response.read()
                    error = error_from_response(response)
                finally:
                    response.close()
                delay = self.retry_policy.delay_for_status(
                    response.status_code, error.retry_after, attempt, rng=self._rng
                )
                if delay is None:
                    raise error
            self._sleep(delay)
            attempt += 1
