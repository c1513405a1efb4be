"""Load generators and probes shared by the benchmarks: HTTP clients and RSS.

The webhook receiver is the tests' (``tests.support.Receiver``).

Everything here talks to 127.0.0.1 only and every loop is bounded twice, by a
count and by a deadline, so a benchmark always ends by itself even when the
system under test stalls.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from bench.harness import summary
from tests.support import wait_for


@dataclass
class LoadResult:
    """What ``hammer`` saw: successes, failures, the wall time and per-request latencies (ms)."""

    ok: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "rate_per_s": round(self.rate, 1),
            "latency_ms": summary(self.latencies_ms),
            "first_error": self.first_error,
        }


def hammer(
    url: str,
    make_body: Callable[[int], dict[str, Any]],
    *,
    clients: int,
    total: int,
    max_seconds: float,
    headers: dict[str, str] | list[dict[str, str]] | None = None,
    expect: tuple[int, ...] = (200, 202),
) -> LoadResult:
    """POST ``total`` requests with ``clients`` concurrent keep-alive sessions; stop at ``max_seconds``.

    ``headers`` may be a list: client *k* then sends ``headers[k % len]``
    (one API key per client, to spread the load over organizations).

    Threads are enough: the client spends its time waiting on sockets, and
    the same generator drives Waybill and its baseline, so whatever it costs
    on the shared cores it costs both sides alike.
    """
    counter = itertools.count()
    deadline = time.monotonic() + max_seconds
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    first_error = [""]
    start_gate = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        session = requests.Session()
        if isinstance(headers, list):
            session.headers.update(headers[k % len(headers)])
        elif headers:
            session.headers.update(headers)
        mine: list[float] = []
        failed = 0
        start_gate.wait()
        while time.monotonic() < deadline:
            i = next(counter)  # itertools.count is atomic under the GIL
            if i >= total:
                break
            t0 = time.perf_counter()
            try:
                r = session.post(url, json=make_body(i), timeout=30)
                good = r.status_code in expect
                detail = f"HTTP {r.status_code}: {r.text[:200]}"
            except requests.RequestException as exc:
                good, detail = False, f"{type(exc).__name__}: {exc}"[:200]
            if good:
                mine.append((time.perf_counter() - t0) * 1000)
            else:
                failed += 1
                with lock:
                    first_error[0] = first_error[0] or detail
        session.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    started = time.perf_counter()
    for t in threads:
        t.join(max_seconds + 60)
    elapsed = time.perf_counter() - started
    return LoadResult(len(latencies), errors[0], elapsed, latencies, first_error[0])


def rss_mib(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return 0.0


def children(pid: int) -> list[int]:
    """Direct children: gunicorn's workers under its arbiter, Celery's pool under its main process."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def wait_children(pid: int, count: int, timeout: float = 60.0) -> list[int]:
    """The process's children once there are ``count`` of them (a pool forks after start-up)."""
    found: list[int] = wait_for(
        lambda: kids if len(kids := children(pid)) >= count else None,
        timeout,
        f"{count} child processes of {pid}",
        interval=0.2,
    )
    return found
