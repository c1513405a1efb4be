"""The asynchronous client: :class:`AsyncClient`, the mirror of :class:`~waybill_client.Client`."""

from __future__ import annotations

import asyncio
import builtins
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
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

__all__ = ["AsyncClient"]


class AsyncClient:
    """The asyncio client, on :class:`httpx.AsyncClient`: every method of :class:`~waybill_client.Client`
    as a coroutine (``list`` and ``events`` as async iterators), with the same arguments and retries.

    ``async with AsyncClient(url, key) as wb:``
    ``task = await wb.wait((await wb.submit("echo", {"hello": "world"})).task_id)``
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
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.retry_policy = retry_policy or RetryPolicy(max_retries=max_retries)
        self._timeout = _core.timeout_of(timeout)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=_core.default_headers(api_key, headers),
            timeout=self._timeout,
            transport=transport,
            follow_redirects=False,
        )
        self._sleep = sleep or asyncio.sleep
        self._rng = rng

    # -- lifecycle ---------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- tasks -------------------------------------------------------------

    async def submit(
        self,
        type: str,
        input: Any = None,
        *,
        webhook: str | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        cancel_after: int | None = None,
    ) -> Task:
        """``POST /v1/tasks``; see :meth:`Client.submit`."""
        body = _core.submission_body(
            type,
            input,
            webhook=webhook,
            idempotency_key=idempotency_key,
            metadata=metadata,
            cancel_after=cancel_after,
        )
        response = await self._send("POST", "/v1/tasks", json=body, idempotent=True)
        return Task.from_json(_core.json_of(response))

    async def submit_many(self, items: Iterable[Submission | Mapping[str, Any]]) -> builtins.list[BatchItem]:
        """``POST /v1/tasks/batch``; see :meth:`Client.submit_many`."""
        body = _core.batch_body(items)
        response = await self._send("POST", "/v1/tasks/batch", json=body, idempotent=True)
        return [BatchItem.from_json(entry) for entry in _core.data_of(response)]

    async def get(self, task_id: str) -> Task:
        """``GET /v1/tasks/{taskId}``."""
        response = await self._send("GET", _core.task_path(task_id), idempotent=True)
        return Task.from_json(_core.json_of(response))

    async def wait(self, task_id: str, timeout: float = 300.0) -> Task:
        """The task once final, by long polls; :class:`WaitTimeout` after ``timeout`` s.

        See :meth:`Client.wait`.
        """
        if timeout < 0:
            raise ValueError("timeout must not be negative")
        path = _core.task_path(task_id)
        deadline = time.monotonic() + timeout
        interval = _core.POLL_FIRST_INTERVAL
        while True:
            asked = _core.prefer_wait_seconds(deadline - time.monotonic())
            started = time.monotonic()
            response = await self._send(
                "GET",
                path,
                headers={"Prefer": f"wait={asked}"} if asked else None,
                timeout=_core.held_timeout(self._timeout, asked),
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
                await self._sleep(min(interval, remaining))
                interval = min(interval * 2, _core.POLL_MAX_INTERVAL)

    async def cancel(self, task_id: str) -> Task:
        """``POST /v1/tasks/{taskId}/cancel``; :class:`Conflict` if already final."""
        response = await self._send("POST", _core.task_path(task_id, "/cancel"), idempotent=False)
        return Task.from_json(_core.json_of(response))

    async def list(
        self,
        status: str | None = None,
        type: str | None = None,
        idempotency_key: str | None = None,
        limit: int | None = None,
    ) -> AsyncGenerator[Task, None]:
        """Every matching task, newest first, page after page: ``async for task in wb.list(...)``."""
        params = _core.list_params(status, type, idempotency_key, limit)
        seen: set[str] = set()
        while True:
            response = await self._send("GET", "/v1/tasks", params=params, idempotent=True)
            page = _core.page_of(_core.json_of(response))
            for task in page.tasks:
                yield task
            if page.next_cursor is None:
                return
            _core.check_cursor(page.next_cursor, seen)
            params["cursor"] = page.next_cursor

    async def events(self, task_id: str, *, last_event_id: str | None = None) -> AsyncGenerator[Event, None]:
        """The task's events, ending after the final one: ``async for event in wb.events(task_id)``.
        Reconnects with ``Last-Event-ID`` as :meth:`Client.events` does."""
        path = _core.task_path(task_id, "/events")
        failures = 0
        while True:
            parser = SSEParser()
            cause: Exception | None = None
            progressed = False
            try:
                response = await self._send(
                    "GET",
                    path,
                    headers=_core.stream_headers(last_event_id),
                    timeout=_core.stream_timeout(self._timeout),
                    idempotent=True,
                    stream=True,
                )
                try:
                    _core.check_event_stream(response)
                    async for chunk in response.aiter_bytes():
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
                    await response.aclose()
            except httpx.TransportError as exc:
                cause = exc
            failures = 0 if progressed else failures
            delay = _core.reconnect_delay(self.retry_policy, failures, parser.retry, self._rng)
            if delay is None:
                raise NetworkError(
                    f"the event stream of task {task_id} ended before its final event"
                ) from cause
            failures += 1
            await self._sleep(delay)

    async def deliveries(self, task_id: str) -> builtins.list[Delivery]:
        """``GET /v1/tasks/{taskId}/deliveries``."""
        response = await self._send("GET", _core.task_path(task_id, "/deliveries"), idempotent=True)
        return [Delivery.from_json(d) for d in _core.data_of(response)]

    # -- the organization --------------------------------------------------

    async def organization(self) -> Organization:
        """``GET /v1/organization``."""
        response = await self._send("GET", "/v1/organization", idempotent=True)
        return Organization.from_json(_core.json_of(response))

    async def task_types(self) -> builtins.list[TaskType]:
        """``GET /v1/task-types``."""
        return _core.task_types_of(_core.json_of(await self._send("GET", "/v1/task-types", idempotent=True)))

    async def webhook_secret(self) -> str:
        """``GET /v1/webhook-secret``."""
        return _core.secret_of(_core.json_of(await self._send("GET", "/v1/webhook-secret", idempotent=True)))

    # -- transport ---------------------------------------------------------

    async def _send(
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
        """One call, retried per :attr:`retry_policy`; see :meth:`Client._send`."""
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
                response = await self._http.send(request, stream=stream)
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
                        await response.aread()
                    error = error_from_response(response)
                finally:
                    await response.aclose()
                delay = self.retry_policy.delay_for_status(
                    response.status_code, error.retry_after, attempt, rng=self._rng
                )
                if delay is None:
                    raise error
            await self._sleep(delay)
            attempt += 1
