"""waybill_client's event streams and long polls, against a scripted HTTP server on 127.0.0.1.

The server's side of ``GET /v1/tasks/{taskId}/events`` is not in Waybill yet;
these tests check the client's side of the contract (``docs/api.md``):
reconnecting with ``Last-Event-ID`` after a dropped or ended stream, stopping
after the final event, ``Prefer: wait`` polls and their backoff.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from waybill_client import AsyncClient, Client, Event, NetworkError, NotFound, UnexpectedResponse, WaitTimeout


def task(status: str, **extra: Any) -> dict[str, Any]:
    return {"taskId": "t1", "type": "sleep", "status": status, "cost": 1, **extra}


def sse(event_id: int, name: str, data: dict[str, Any]) -> bytes:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()


# One connection's answer: the chunks to send, then how it ends:
# "drop" (closed mid-body), "end" (the body ends cleanly), "hold" (stays open).
Connection = tuple[list[bytes], str]


class Scripted:
    """An HTTP/1.1 server on 127.0.0.1 answering each request from ``handler``; records requests."""

    def __init__(self, handler: Callable[[BaseHTTPRequestHandler, int], None]) -> None:
        self.requests: list[dict[str, str]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with scripted.lock:
                    scripted.requests.append(
                        {"path": self.path, **{k.lower(): v for k, v in self.headers.items()}}
                    )
                    n = len(scripted.requests)
                handler(self, n)

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def stream_handler(connections: list[Connection]) -> Callable[[BaseHTTPRequestHandler, int], None]:
    def handle(h: BaseHTTPRequestHandler, n: int) -> None:
        if n > len(connections):
            h.send_response(500)
            h.send_header("Content-Length", "0")
            h.send_header("Connection", "close")
            h.end_headers()
            return
        chunks, ending = connections[n - 1]
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        # Every scripted connection ends after its answer: say so, or httpx may
        # reuse the closed connection for the next request and retry it (an
        # extra backoff sleep the counts below would see).
        h.send_header("Connection", "close")
        h.end_headers()
        for chunk in chunks:
            h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            h.wfile.flush()
        if ending == "end":
            h.wfile.write(b"0\r\n\r\n")
        elif ending == "hold":
            time.sleep(3)  # the client must not wait for this: it stops after the final event
            h.wfile.write(b"0\r\n\r\n")
        else:  # drop: no terminating chunk, the connection closed
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
        h.close_connection = True

    return handle


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(handler: Callable[[BaseHTTPRequestHandler, int], None]) -> Scripted:
        servers.append(Scripted(handler))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


RECONNECTING = [
    # 1: two events, a comment, half of a third event, then the connection drops.
    (
        [
            b": hello\n\n",
            sse(1, "task.queued", task("queued")),
            sse(2, "task.started", task("running")) + b": keep-alive\n\nid: 3\nevent: task.pro",
        ],
        "drop",
    ),
    # 2: resumed after 2; the server sets the reconnection delay, then ends the body cleanly.
    (
        [
            b"retry: 10\n\n",
            sse(3, "task.progress", task("running", progress={"fraction": 0.5, "message": "half"})),
        ],
        "end",
    ),
    # 3: resumed after 3: the final event, then the connection stays open.
    ([sse(4, "task.succeeded", task("succeeded", result={"sleptSeconds": 1}))], "hold"),
]


def check_reconnections(server: Scripted, events: list[Event], sleeps: list[float]) -> None:
    assert [(e.id, e.event) for e in events] == [
        ("1", "task.queued"),
        ("2", "task.started"),
        ("3", "task.progress"),
        ("4", "task.succeeded"),
    ]
    assert events[2].task.progress is not None and events[2].task.progress.message == "half"
    assert events[-1].is_final and events[-1].task.result == {"sleptSeconds": 1}
    assert [r.get("last-event-id") for r in server.requests] == [None, "2", "3"]
    assert all(r["path"] == "/v1/tasks/t1/events" for r in server.requests)
    assert all(
        r["accept"] == "text/event-stream" and r["authorization"] == "Bearer k" for r in server.requests
    )
    # After the drop: the backoff (no retry: yet); after the clean end: the server's 10 ms.
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and sleeps[1] == 0.01


def test_events_reconnect_with_last_event_id_until_the_final_event(scripted: Callable[..., Scripted]) -> None:
    server = scripted(stream_handler(RECONNECTING))
    sleeps: list[float] = []
    started = time.monotonic()
    with Client(server.url, "k", sleep=sleeps.append) as wb:
        events = list(wb.events("t1"))
    check_reconnections(server, events, sleeps)
    assert time.monotonic() - started < 2.5  # did not wait for the held connection to end


def test_async_events_reconnect_the_same_way(scripted: Callable[..., Scripted]) -> None:
    server = scripted(stream_handler(RECONNECTING))
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def main() -> list[Event]:
        async with AsyncClient(server.url, "k", sleep=record) as wb:
            return [e async for e in wb.events("t1")]

    check_reconnections(server, asyncio.run(main()), sleeps)


def test_events_start_after_the_given_last_event_id(scripted: Callable[..., Scripted]) -> None:
    server = scripted(stream_handler([([sse(9, "task.canceled", task("canceled"))], "end")]))
    with Client(server.url, "k") as wb:
        events = list(wb.events("t1", last_event_id="8"))
    assert [e.event for e in events] == ["task.canceled"] and server.requests[0]["last-event-id"] == "8"


def test_events_give_up_after_max_retries_without_news(scripted: Callable[..., Scripted]) -> None:
    server = scripted(
        stream_handler([([sse(1, "task.queued", task("queued"))], "end")] + [([b": idle\n\n"], "end")] * 5)
    )
    sleeps: list[float] = []
    seen: list[str | None] = []
    with Client(server.url, "k", max_retries=2, sleep=sleeps.append) as wb, pytest.raises(NetworkError):
        for event in wb.events("t1"):
            seen.append(event.id)
    # One event, then max_retries reconnections in a row that bring nothing new.
    assert seen == ["1"] and len(server.requests) == 3 and len(sleeps) == 2
    assert [r.get("last-event-id") for r in server.requests] == [None, "1", "1"]


def test_events_stop_when_the_caller_stops(scripted: Callable[..., Scripted]) -> None:
    server = scripted(stream_handler([([sse(1, "task.queued", task("queued"))], "hold")]))
    with Client(server.url, "k") as wb:
        stream = wb.events("t1")
        first = next(stream)
        stream.close()  # closes the response: no reconnection
    assert first.event == "task.queued" and len(server.requests) == 1


def problem_handler(status: int) -> Callable[[BaseHTTPRequestHandler, int], None]:
    def handle(h: BaseHTTPRequestHandler, _n: int) -> None:
        body = json.dumps(
            {"type": "urn:waybill:problem:not-found", "title": "Not found", "status": status, "detail": "no"}
        )
        h.send_response(status)
        h.send_header("Content-Type", "application/problem+json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body.encode())

    return handle


def test_events_of_an_unknown_task_raise_not_found(scripted: Callable[..., Scripted]) -> None:
    server = scripted(problem_handler(404))
    with Client(server.url, "k") as wb, pytest.raises(NotFound):
        list(wb.events("nope"))
    assert len(server.requests) == 1


def test_events_refuse_an_answer_that_is_not_a_stream(scripted: Callable[..., Scripted]) -> None:
    def handle(h: BaseHTTPRequestHandler, _n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "2")
        h.end_headers()
        h.wfile.write(b"{}")

    server = scripted(handle)
    with Client(server.url, "k") as wb, pytest.raises(UnexpectedResponse, match="text/event-stream"):
        list(wb.events("t1"))


def poll_handler(answers: list[tuple[dict[str, Any], bool]]) -> Callable[[BaseHTTPRequestHandler, int], None]:
    """Answers poll n with answers[n-1]: (task, whether to say Preference-Applied), at once."""

    def handle(h: BaseHTTPRequestHandler, n: int) -> None:
        body, applied = answers[min(n, len(answers)) - 1]
        payload = json.dumps(body).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        if applied:
            h.send_header("Preference-Applied", "wait=60")
        h.end_headers()
        h.wfile.write(payload)

    return handle


def test_wait_asks_prefer_wait_and_backs_off_when_not_held(scripted: Callable[..., Scripted]) -> None:
    # The server answers at once, once even claiming it held the poll: the client must back off.
    answers = [
        (task("queued"), False),
        (task("running"), True),
        (task("running"), False),
        (task("succeeded"), False),
    ]
    server = scripted(poll_handler(answers))
    sleeps: list[float] = []
    with Client(server.url, "k", sleep=sleeps.append) as wb:
        done = wb.wait("t1", timeout=600)
    assert done.status == "succeeded" and len(server.requests) == 4
    assert [r["prefer"] for r in server.requests] == ["wait=60"] * 4
    assert sleeps == [0.25, 0.5, 1.0]


def test_wait_asks_no_longer_than_its_timeout(scripted: Callable[..., Scripted]) -> None:
    server = scripted(poll_handler([(task("succeeded"), False)]))
    with Client(server.url, "k") as wb:
        assert wb.wait("t1", timeout=12.7).status == "succeeded"
        assert wb.wait("t1", timeout=0).status == "succeeded"
    assert server.requests[0]["prefer"] == "wait=12" and "prefer" not in server.requests[1]


def test_wait_times_out_with_the_last_task(scripted: Callable[..., Scripted]) -> None:
    server = scripted(poll_handler([(task("running"), False)]))
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    started = time.monotonic()
    with Client(server.url, "k", sleep=sleep) as wb, pytest.raises(WaitTimeout) as caught:
        wb.wait("t1", timeout=0.6)
    assert 0.6 <= time.monotonic() - started < 3
    assert caught.value.task is not None and caught.value.task.status == "running"
    assert caught.value.task_id == "t1" and len(server.requests) == len(sleeps) + 1 >= 2


def test_async_wait(scripted: Callable[..., Scripted]) -> None:
    server = scripted(
        poll_handler([(task("running"), False), (task("failed", error={"code": "x", "message": "y"}), False)])
    )

    async def main() -> str | None:
        async def no_sleep(_s: float) -> None:
            return None

        async with AsyncClient(server.url, "k", sleep=no_sleep) as wb:
            done = await wb.wait("t1", timeout=30)
            return done.error.code if done.error else None

    assert asyncio.run(main()) == "x" and server.requests[0]["prefer"] == "wait=30"
