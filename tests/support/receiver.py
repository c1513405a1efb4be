"""A real HTTP webhook receiver on 127.0.0.1, for tests and benchmarks.

Every request is recorded (path, headers, body, arrival time) before
it is answered, so whoever sees the sender's record of an attempt also finds
the request here. ``respond`` decides each answer from the request's number.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

# status, headers, body, and seconds to wait before answering
Answer = tuple[int, dict[str, str], bytes, float]


def answer_ok(_n: int) -> Answer:
    return 200, {}, b"ok", 0.0


def answer_no_content(_n: int) -> Answer:
    return 204, {}, b"", 0.0


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.perf_counter() of this process when the request arrived


def event_task_id(body: bytes) -> str:
    """The event's ``data.taskId``, or "" when the body is not a Waybill event."""
    try:
        return str(json.loads(body)["data"]["taskId"])
    except (ValueError, KeyError, TypeError):
        return ""


class Receiver:
    """Records every request; ``with Receiver() as r:`` closes it at the end."""

    def __init__(self, respond: Callable[[int], Answer] = answer_ok, port: int = 0) -> None:
        self.respond = respond
        self.received: list[Received] = []
        self.first_arrival: dict[str, float] = {}  # task id -> ``at`` of its first event
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a production receiver would allow.
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:  # one line per request is noise
                pass

            def do_POST(self) -> None:
                at = time.perf_counter()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                n = receiver._record(self.path, dict(self.headers.items()), body, at)
                status, headers, payload, delay = receiver.respond(n)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender gave up first (its deadline): what a slow receiver tests

            do_GET = do_POST  # a followed redirect would arrive as a GET

        # ``port``: a given one, to bring back a receiver that was down (0: any free port).
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _record(self, path: str, headers: dict[str, str], body: bytes, at: float) -> int:
        """Record a request; returns its number (1 for the first), which ``respond`` answers."""
        lowered = {k.lower(): v for k, v in headers.items()}
        task_id = event_task_id(body)  # parsed outside the lock: handlers run side by side
        with self.cond:
            n = len(self.received) + 1
            self.received.append(Received(path, lowered, body, at))
            if task_id:
                self.first_arrival.setdefault(task_id, at)
            self.cond.notify_all()
        return n

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in list(self.received)]

    def times(self) -> list[float]:
        """Every arrival time, duplicates included."""
        with self.cond:
            return [r.at for r in self.received]

    def task_count(self) -> int:
        """How many tasks' events arrived (a task's repeated events count once)."""
        with self.cond:
            return len(self.first_arrival)

    def wait_for_task(self, task_id: str, timeout: float) -> float | None:
        """The arrival time of ``task_id``'s first event, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while task_id not in self.first_arrival:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.first_arrival[task_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()
