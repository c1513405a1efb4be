"""waybill_client's retries: the decisions (RetryPolicy), then the clients on httpx.MockTransport.

MockTransport stands in for the server only here, to produce the answers a
real server rarely gives on demand (503, a dropped connection, 429).
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from waybill_client import (
    AsyncClient,
    BadRequest,
    Client,
    NetworkError,
    RateLimited,
    RetryPolicy,
    ServiceUnavailable,
    Submission,
)

TASK = {
    "taskId": "t1",
    "type": "echo",
    "status": "queued",
    "cost": 1,
    "createdAt": "2026-01-01T00:00:00.000Z",
}


# -- the decisions ------------------------------------------------------------


def test_backoff_doubles_within_its_cap_with_jitter() -> None:
    policy = RetryPolicy(max_retries=10, backoff_base=0.5, backoff_max=8.0)
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(8.0, 0.5 * 2**attempt)
        delays = [policy.backoff(attempt, rng) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays), attempt
        assert len(set(delays)) > 1  # jittered
    assert policy.backoff(10_000, rng) <= 8.0


def test_which_statuses_are_retried() -> None:
    policy = RetryPolicy(max_retries=3)
    rng = random.Random(1)
    assert policy.delay_for_status(429, 2.0, 0, rng) == 2.0
    assert policy.delay_for_status(503, 0.0, 0, rng) == 0.0
    assert 0.25 <= (policy.delay_for_status(503, None, 0, rng) or 0) <= 0.5
    assert 0.25 <= (policy.delay_for_status(429, None, 0, rng) or 0) <= 0.5
    assert policy.delay_for_status(429, 61.0, 0, rng) is None  # longer than max_retry_after: raise now
    for status in (400, 401, 402, 404, 409, 413, 415, 422, 500, 502, 504):
        assert policy.delay_for_status(status, None, 0, rng) is None, status
        assert policy.delay_for_status(status, 1.0, 0, rng) is None, status
    assert policy.delay_for_status(503, None, 2, rng) is not None
    assert policy.delay_for_status(503, None, 3, rng) is None  # max_retries reached
    assert RetryPolicy(max_retries=0).delay_for_status(503, None, 0, rng) is None


def test_which_transport_errors_are_retried() -> None:
    policy = RetryPolicy(max_retries=2)
    request = httpx.Request("POST", "http://x/")
    never_sent = [
        httpx.ConnectError("refused", request=request),
        httpx.ConnectTimeout("t"),
        httpx.PoolTimeout("p"),
    ]
    maybe_sent = [
        httpx.ReadError("reset", request=request),
        httpx.ReadTimeout("t"),
        httpx.WriteError("w"),
        httpx.RemoteProtocolError("peer closed", request=request),
    ]
    for exc in never_sent:
        assert policy.delay_for_exception(exc, 0, idempotent=False) is not None, exc
        assert policy.delay_for_exception(exc, 0, idempotent=True) is not None, exc
    for exc in maybe_sent:
        assert policy.delay_for_exception(exc, 0, idempotent=False) is None, exc
        assert policy.delay_for_exception(exc, 0, idempotent=True) is not None, exc
    assert policy.delay_for_exception(httpx.ConnectError("x"), 2, idempotent=True) is None
    assert policy.delay_for_exception(httpx.UnsupportedProtocol("ftp"), 0, idempotent=True) is None
    assert policy.delay_for_exception(ValueError("x"), 0, idempotent=True) is None


# -- the clients --------------------------------------------------------------


class Script:
    """Answers requests in order from a list: an httpx.Response to return or an exception to raise."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.bodies: list[Any] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(json.loads(request.content) if request.content else None)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def problem(status: int, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"type": "urn:waybill:problem:x", "title": "t", "status": status, "detail": "d", **extra}
    return httpx.Response(
        status, json=body, headers={"content-type": "application/problem+json", **(headers or {})}
    )


def make_client(script: Script, sleeps: list[float], **kwargs: Any) -> Client:
    return Client(
        "http://waybill.test/",
        "wb_key",
        transport=httpx.MockTransport(script),
        sleep=sleeps.append,
        rng=random.Random(3),
        **kwargs,
    )


def test_503_then_202_is_one_submission_with_one_key() -> None:
    script = Script(problem(503), httpx.Response(202, json=TASK))
    sleeps: list[float] = []
    with make_client(script, sleeps) as wb:
        task = wb.submit("echo", {"x": 1})
    assert task.task_id == "t1" and task.status == "queued"
    assert len(script.requests) == 2 and len(sleeps) == 1 and 0.25 <= sleeps[0] <= 0.5
    first, second = script.bodies
    assert first == second and uuid.UUID(first["idempotencyKey"]).version == 4
    assert script.requests[0].headers["authorization"] == "Bearer wb_key"
    assert str(script.requests[0].url) == "http://waybill.test/v1/tasks"


def test_connection_error_then_success_resends_the_same_generated_key() -> None:
    # The first request may have reached the server (reset before the answer):
    # only the key makes its repetition safe.
    script = Script(httpx.ReadError("connection reset"), httpx.Response(200, json=TASK))
    sleeps: list[float] = []
    with make_client(script, sleeps) as wb:
        assert wb.submit("echo", {"x": 1}).task_id == "t1"
    keys = [b["idempotencyKey"] for b in script.bodies]
    assert len(keys) == 2 and keys[0] == keys[1] and len(sleeps) == 1


def test_each_call_generates_its_own_key_and_a_given_key_is_sent() -> None:
    script = Script(*(httpx.Response(202, json=TASK) for _ in range(3)))
    with make_client(script, []) as wb:
        wb.submit("echo")
        wb.submit("echo")
        wb.submit("echo", idempotency_key="mine")
    keys = [b["idempotencyKey"] for b in script.bodies]
    assert keys[0] != keys[1] and keys[2] == "mine"


def test_429_retry_after_is_honoured() -> None:
    script = Script(problem(429, {"Retry-After": "7"}), httpx.Response(202, json=TASK))
    sleeps: list[float] = []
    with make_client(script, sleeps) as wb:
        wb.submit("echo")
    assert sleeps == [7.0]


def test_429_with_a_long_retry_after_raises_at_once() -> None:
    script = Script(problem(429, {"Retry-After": "600"}, queued=5, queueLimit=5))
    sleeps: list[float] = []
    with make_client(script, sleeps) as wb, pytest.raises(RateLimited) as caught:
        wb.submit("echo")
    assert caught.value.retry_after == 600.0 and caught.value.queue_limit == 5
    assert sleeps == [] and len(script.requests) == 1


def test_retries_stop_at_max_retries() -> None:
    script = Script(*(problem(503, {"Retry-After": "1"}) for _ in range(3)))
    sleeps: list[float] = []
    with make_client(script, sleeps, max_retries=2) as wb, pytest.raises(ServiceUnavailable):
        wb.get("t1")
    assert len(script.requests) == 3 and sleeps == [1.0, 1.0]


@pytest.mark.parametrize("status", [400, 401, 402, 404, 409, 422, 500])
def test_other_errors_are_never_retried(status: int) -> None:
    script = Script(problem(status), httpx.Response(202, json=TASK))
    sleeps: list[float] = []
    with make_client(script, sleeps) as wb, pytest.raises(Exception) as caught:
        wb.submit("echo")
    assert getattr(caught.value, "status", None) == status
    assert len(script.requests) == 1 and sleeps == []


def test_a_bad_request_carries_its_errors() -> None:
    script = Script(problem(400, errors={"input.seconds": ["Must be at most 300."]}))
    with make_client(script, []) as wb, pytest.raises(BadRequest) as caught:
        wb.submit("sleep", {"seconds": 301})
    assert caught.value.errors == {"input.seconds": ["Must be at most 300."]}


def test_cancel_is_repeated_only_when_it_never_reached_the_server() -> None:
    refused = Script(httpx.ConnectError("refused"), httpx.Response(200, json={**TASK, "status": "canceled"}))
    with make_client(refused, []) as wb:
        assert wb.cancel("t1").status == "canceled"
    assert len(refused.requests) == 2 and refused.requests[0].url.path == "/v1/tasks/t1/cancel"
    reset = Script(httpx.ReadError("reset"), httpx.Response(200, json=TASK))
    with make_client(reset, []) as wb, pytest.raises(NetworkError) as caught:
        wb.cancel("t1")
    assert len(reset.requests) == 1 and isinstance(caught.value.__cause__, httpx.ReadError)


def test_connection_errors_exhausted_raise_network_error() -> None:
    script = Script(*(httpx.ConnectError("refused") for _ in range(4)))
    sleeps: list[float] = []
    with make_client(script, sleeps) as wb, pytest.raises(NetworkError):
        wb.organization()
    assert len(script.requests) == 4 and len(sleeps) == 3
    # Exponential with equal jitter: [0.25, 0.5], [0.5, 1], [1, 2].
    assert [lo <= s <= 2 * lo for lo, s in zip([0.25, 0.5, 1.0], sleeps, strict=True)] == [True] * 3


def test_batch_retry_resends_the_same_generated_keys() -> None:
    entries = {"data": [{"status": 202, "task": TASK}, {"status": 202, "task": {**TASK, "taskId": "t2"}}]}
    script = Script(problem(503), httpx.Response(200, json=entries))
    with make_client(script, []) as wb:
        items = wb.submit_many(
            [Submission("echo", 1), {"type": "echo", "input": 2, "idempotencyKey": "given"}]
        )
    assert [i.task.task_id for i in items if i.task] == ["t1", "t2"]
    first, second = script.bodies
    assert first == second
    assert first["tasks"][1]["idempotencyKey"] == "given"
    assert uuid.UUID(first["tasks"][0]["idempotencyKey"]).version == 4


def run(coro_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coro_factory())


def test_async_client_retries_the_same_way() -> None:
    script = Script(
        problem(503),
        httpx.ReadError("reset"),
        problem(429, {"Retry-After": "3"}),
        httpx.Response(202, json=TASK),
    )
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def main() -> str:
        async with AsyncClient(
            "http://waybill.test",
            "wb_key",
            transport=httpx.MockTransport(script),
            sleep=record,
            rng=random.Random(3),
        ) as wb:
            return (await wb.submit("echo", {"x": 1})).task_id

    assert run(main) == "t1"
    assert len(script.requests) == 4 and len(sleeps) == 3 and sleeps[2] == 3.0
    assert len({b["idempotencyKey"] for b in script.bodies}) == 1


def test_async_client_does_not_retry_a_400() -> None:
    script = Script(problem(400), httpx.Response(202, json=TASK))

    async def main() -> None:
        async with AsyncClient("http://waybill.test", "k", transport=httpx.MockTransport(script)) as wb:
            await wb.submit("echo")

    with pytest.raises(BadRequest):
        run(main)
    assert len(script.requests) == 1
