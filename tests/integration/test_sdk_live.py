"""The SDK live against a real Waybill: events across a dropped connection, progress, deadlines, webhooks.

The stream test puts a TCP relay on 127.0.0.1 between the client and
gunicorn that cuts the first connection right after it has carried the
``task.started`` event: the client must reconnect with ``Last-Event-ID`` and
see every later event exactly once. The webhook test asks for every event
and verifies each delivery with the SDK's ``verify_webhook``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import pytest
from waybill_client import Client, verify_webhook

from tests.support import Receiver, Stack, wait_for
from tests.support.receiver import event_task_id

pytestmark = pytest.mark.integration


class CuttingRelay:
    """Forwards 127.0.0.1:port -> upstream; cuts the first connection once it carried ``marker``."""

    def __init__(self, upstream: str, marker: bytes) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.marker = marker
        self.connections = 0
        self.cut = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.5)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            cut_this = self.connections == 1
            upstream = socket.create_connection(self.upstream, timeout=30)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, cut_this), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, cut: bool) -> None:
        seen = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if cut:
                    seen = (seen + data)[-4096:]
                    if self.marker in seen:
                        self.cut.set()
                        break
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.server.close()


@pytest.fixture
def live(make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    stack = make_stack()
    stack.web()
    stack.worker()
    stack.webhooks_worker()
    stack.beat()  # the sweep expires deadlines
    yield stack


def test_events_resume_after_a_dropped_connection_and_show_progress(live: Stack) -> None:
    org = live.org(credits=100)
    relay = CuttingRelay(live.base_url, b"event: task.started")
    try:
        with Client(relay.url, org.api_key, timeout=30) as wb:
            task = wb.submit("sleep", {"seconds": 2.5})
            events = list(wb.events(task.task_id))
        assert relay.cut.is_set() and relay.connections >= 2  # it did drop, and the client came back
    finally:
        relay.close()
    names = [e.event for e in events]
    assert names[:2] == ["task.queued", "task.started"] and names[-1] == "task.succeeded", names
    assert names.count("task.started") == 1 and names.count("task.succeeded") == 1
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(set(ids)), ids  # nothing twice across the reconnect
    progress = [e.task.progress for e in events if e.event == "task.progress"]
    assert progress and all(p is not None and 0 < (p.fraction or 0) < 1 for p in progress)
    assert events[-1].task.result is not None and events[-1].task.result["sleptSeconds"] >= 2.5


def test_a_deadline_cancels_and_refunds_through_the_sdk(live: Stack) -> None:
    org = live.org(credits=100)
    with Client(live.base_url, org.api_key, timeout=30) as wb:
        task = wb.submit("sleep", {"seconds": 30}, cancel_after=2)
        assert task.cancel_after == 2
        done = wb.wait(task.task_id, timeout=30)
        assert done.status == "canceled" and done.error is not None
        assert done.error.code == "deadline_exceeded"
        assert wb.organization().credits == 100  # refunded
        assert [e.event for e in wb.events(task.task_id)][-1] == "task.canceled"


def test_every_event_asked_for_arrives_signed_and_verifies(live: Stack, receiver: Receiver) -> None:
    org = live.org(credits=100)
    wanted = ["task.started", "task.progress", "task.succeeded"]
    with Client(live.base_url, org.api_key, timeout=30) as wb:
        secret = wb.webhook_secret()
        task = wb.submit("sleep", {"seconds": 2.2}, webhook={"url": receiver.url + "/all", "events": wanted})
        assert task.webhook is not None and task.webhook.events == tuple(wanted)
        assert wb.wait(task.task_id, timeout=60).status == "succeeded"

        def arrived() -> list[str] | None:
            got = [verify_webhook(r.body, r.headers, secret) for r in list(receiver.received)]
            types = [e.type for e in got if e.task.task_id == task.task_id]
            return types if "task.succeeded" in types and "task.started" in types else None

        types = wait_for(arrived, 30, "the started and final webhooks")
        assert "task.progress" in types
        mine = [r for r in list(receiver.received) if event_task_id(r.body) == task.task_id]
        assert len({r.headers["webhook-id"] for r in mine}) == len(mine)  # each event its own id
        deliveries = wb.deliveries(task.task_id)
        assert {d.event for d in deliveries} == set(wanted)
        assert sum(d.event == "task.progress" for d in deliveries) <= 4  # ~1 a second over 2.2 s
