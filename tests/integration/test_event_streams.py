"""``GET /v1/tasks/{id}/events`` on the real stack: 200 open streams on one web process.

``waybill serve`` (one gunicorn process, as the Procfile runs it) holds 200
event streams open on 20 queued tasks while a client submits; then a worker
runs the tasks (``sleep`` reports its progress) and every stream must see
started, progress and the final event, committed by another process and
carried by Redis pub/sub. The submission latencies before and during the
streams are printed (``-s``) for docs/performance.rst; the bound asserted
here is loose on purpose (this is a correctness test on a shared machine;
``bench/`` holds the speed figures).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import requests

from tests.support import Api, Stack, wait_for

pytestmark = pytest.mark.integration

STREAMS = 200
TASKS = 20
SUBMISSIONS = 40


class Stream:
    """One SSE connection read on its own thread: the events it saw, in order."""

    def __init__(self, url: str, headers: dict[str, str], last_event_id: str | None = None) -> None:
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.opened = threading.Event()
        self.ended = threading.Event()
        headers = dict(headers)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self._thread = threading.Thread(target=self._read, args=(url, headers), daemon=True)
        self._thread.start()

    def _read(self, url: str, headers: dict[str, str]) -> None:
        try:
            with requests.get(url, headers=headers, stream=True, timeout=(5, 30)) as r:
                self.status = r.status_code
                fields: dict[str, str] = {}
                for line in r.iter_lines(decode_unicode=True):
                    if line == "":
                        if "event" in fields:
                            self.events.append(
                                (int(fields["id"]), fields["event"], json.loads(fields["data"]))
                            )
                            self.opened.set()
                        fields = {}
                    elif not line.startswith(":"):
                        name, _, value = line.partition(": ")
                        fields[name] = value
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.opened.set()
            self.ended.set()

    def names(self) -> list[str]:
        return [name for _, name, _ in self.events]


def _web_rss(master_pid: int) -> int:
    """Resident memory of the gunicorn worker(s) under ``waybill serve``'s master."""
    return sum(child.memory_info().rss for child in psutil.Process(master_pid).children(recursive=True))


def _latencies(api: Api, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.monotonic()
        r = api.submit({"type": "echo"})
        out.append(time.monotonic() - started)
        assert r.status_code == 202, r.text
    return out


def test_two_hundred_open_streams_see_every_event_while_submissions_still_answer(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    web = stack.serve(workers=1, threads=16)  # 16 threads for requests + EVENT_STREAMS_PER_PROCESS (200)
    org = stack.org(credits=10_000, concurrency_limit=TASKS)
    api = Api(stack.base_url, org)
    before = _latencies(api, SUBMISSIONS)
    rss_before = _web_rss(web.pid)

    task_ids = []
    for _ in range(TASKS):
        r = api.submit({"type": "sleep", "input": {"seconds": 2.5}})
        assert r.status_code == 202
        task_ids.append(r.json()["taskId"])
    streams = [
        Stream(f"{stack.base_url}/v1/tasks/{task_ids[i % TASKS]}/events", org.headers) for i in range(STREAMS)
    ]
    for s in streams:
        assert s.opened.wait(30), "a stream never opened"
    assert all(s.status == 200 and s.names() == ["task.queued"] for s in streams), [
        (s.status, s.names(), s.error) for s in streams if s.names() != ["task.queued"]
    ][:3]
    during = _latencies(api, SUBMISSIONS)  # 200 streams open on this very process
    rss_during = _web_rss(web.pid)
    # One more stream than the bound: refused at once, the others unharmed.
    extra = requests.get(f"{stack.base_url}/v1/tasks/{task_ids[0]}/events", headers=org.headers, timeout=10)
    assert extra.status_code == 503 and extra.headers["Retry-After"]

    stack.worker(concurrency=4)
    for s in streams:
        assert s.ended.wait(90), "a stream did not end after its task's final event"
    for s in streams:
        assert s.error is None, s.error
        names = s.names()
        assert names[0] == "task.queued" and names[1] == "task.started" and names[-1] == "task.succeeded", (
            names
        )
        assert "task.progress" in names, names  # sleep 2.5 s reports about every 0.5 s
        ids = [i for i, _, _ in s.events]
        assert ids == sorted(set(ids)), ids
        progress = [data["progress"] for _, name, data in s.events if name == "task.progress"]
        assert all(0 < p["fraction"] < 1 and p["message"].startswith("slept") for p in progress)

    # A reconnect after the second event gets only what came after it.
    late = Stream(f"{stack.base_url}/v1/tasks/{task_ids[0]}/events", org.headers, last_event_id="2")
    assert late.ended.wait(30)
    assert late.names()[0] == "task.progress" and late.names()[-1] == "task.succeeded"
    assert all(i > 2 for i, _, _ in late.events)

    p50_before, p50_during = statistics.median(before), statistics.median(during)
    print(
        f"\nsubmission latency p50: {p50_before * 1000:.1f} ms alone, {p50_during * 1000:.1f} ms with "
        f"{STREAMS} open streams on the same web process (max {max(during) * 1000:.1f} ms); "
        f"the web process's RSS {rss_before / 2**20:.1f} -> {rss_during / 2**20:.1f} MiB"
    )
    # Loose: streams wait on sockets, not on the threads submissions need.
    assert p50_during < max(5 * p50_before, 0.25), (p50_before, p50_during)
    wait_for(lambda: api.get(task_ids[-1])["status"] == "succeeded", 10, "the last task")
