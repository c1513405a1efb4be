"""Latency on an idle system: submit -> succeeded (polling), submit -> webhook, raw Celery round trip.

One client, one task at a time, with every Procfile process running (web,
``tasks`` worker, ``webhooks,maintenance`` worker, beat) and nothing else to
do. Three kinds of sample, taken in turn so that background noise on the
machine falls on all three alike:

* ``poll``: ``POST /v1/tasks`` (echo), then ``GET /v1/tasks/{id}`` every
  ``--poll-interval`` until it says ``succeeded``; the time until that answer.
* ``webhook``: ``POST /v1/tasks`` (echo) with a webhook to a receiver in this
  process; the time until the receiver has the ``task.succeeded`` event.
* ``raw celery``: ``apply_async`` of a task returning its argument on the
  baseline Celery app (same worker settings, Redis result backend) and
  ``.get()``: the plainest round trip Celery offers.

Target: webhook p50 < 3 x raw Celery p50.

    python bench/latency.py [--db sqlite|postgresql|both] [--samples 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from bench.baseline_app import QUEUE, ROUNDTRIP, make_celery
from bench.harness import DB_KINDS, platform, summary, write_results
from bench.report import bar_chart, table
from tests.support import Receiver, answer_no_content

TIMEOUT = 30.0


def poll_sample(s: requests.Session, base: str, i: int, interval: float) -> float:
    t0 = time.perf_counter()
    r = s.post(base + "/v1/tasks", json={"type": "echo", "input": {"n": i}}, timeout=TIMEOUT)
    assert r.status_code == 202, r.text
    url = f"{base}/v1/tasks/{r.json()['taskId']}"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        status = s.get(url, timeout=TIMEOUT).json()["status"]
        if status == "succeeded":
            return (time.perf_counter() - t0) * 1000
        assert status in ("queued", "running"), status
        time.sleep(interval)
    raise TimeoutError("a task did not succeed within 30 s")


def webhook_sample(s: requests.Session, base: str, hook: Receiver, i: int) -> float:
    t0 = time.perf_counter()
    r = s.post(
        base + "/v1/tasks",
        json={"type": "echo", "input": {"n": i}, "webhook": {"url": hook.url + "/hook"}},
        timeout=TIMEOUT,
    )
    assert r.status_code == 202, r.text
    arrived = hook.wait_for_task(r.json()["taskId"], TIMEOUT)
    if arrived is None:
        raise TimeoutError("a webhook did not arrive within 30 s")
    return (arrived - t0) * 1000


def run(db_kind: str, *, samples: int = 100, poll_interval: float = 0.005, **env: str) -> dict[str, Any]:
    times: dict[str, list[float]] = {"poll": [], "webhook": [], "raw_celery": []}
    with platform(db_kind, **env) as p, Receiver(answer_no_content) as hook:
        p.serve(workers=2)
        p.worker("worker", queues="tasks", concurrency=2)
        p.worker("webhooks", queues="webhooks,maintenance", concurrency=4)
        p.worker("baseline-worker", queues=QUEUE, concurrency=2, app="bench.baseline_app")
        p.beat()
        key = p.org("bench-latency").api_key
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {key}"
        celery = make_celery(p.redis.url)

        def raw(i: int) -> float:
            t0 = time.perf_counter()
            assert celery.send_task(ROUNDTRIP, args=[i], queue=QUEUE).get(timeout=TIMEOUT) == i
            return (time.perf_counter() - t0) * 1000

        # Warm-up, not recorded: every worker process of each pool has run
        # something, connections are open, the result consumer is subscribed.
        for i in range(10):
            poll_sample(s, p.base_url, i, poll_interval)
            webhook_sample(s, p.base_url, hook, i)
            raw(i)
        for i in range(samples):
            times["poll"].append(poll_sample(s, p.base_url, i, poll_interval))
            times["webhook"].append(webhook_sample(s, p.base_url, hook, i))
            times["raw_celery"].append(raw(i))
            time.sleep(0.02)  # idle between samples: nothing of one is still running at the next
        s.close()
    out: dict[str, Any] = {"db": db_kind, "poll_interval_s": poll_interval}
    out.update({k: summary(v) for k, v in times.items()})
    out["webhook_p50_ratio"] = out["webhook"]["p50"] / out["raw_celery"]["p50"]
    out["poll_p50_ratio"] = out["poll"]["p50"] / out["raw_celery"]["p50"]
    return out


def print_results(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        for kind, label in (
            ("poll", "submit->succeeded (poll)"),
            ("webhook", "submit->webhook"),
            ("raw_celery", "raw celery round trip"),
        ):
            s = r[kind]
            rows.append([r["db"], label, s["p50"], s["p95"], s["p99"]])
        rows.append([r["db"], "webhook p50 / raw p50", r["webhook_p50_ratio"], "", ""])
    table(
        "Idle latency, ms (one client, one task at a time)   target: webhook p50 < 3 x raw",
        ["db", "path", "p50", "p95", "p99"],
        rows,
        digits=1,
    )


def chart(results: list[dict[str, Any]]) -> None:
    groups = [f"{r['db']}\n{k}" for r in results for k in ("poll", "webhook", "raw_celery")]
    stats = [r[k] for r in results for k in ("poll", "webhook", "raw_celery")]
    bar_chart(
        "latency",
        "Idle latency (ms)",
        groups,
        {
            "p50": [s["p50"] for s in stats],
            "p95": [s["p95"] for s in stats],
            "p99": [s["p99"] for s in stats],
        },
        "ms",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=[*DB_KINDS, "both"], default="both")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--poll-interval", type=float, default=0.005, help="seconds between polls")
    parser.add_argument("--log-level", default="INFO", help="Waybill's LOG_LEVEL (production default INFO)")
    args = parser.parse_args()
    kinds = list(DB_KINDS) if args.db == "both" else [args.db]
    results = [
        run(k, samples=args.samples, poll_interval=args.poll_interval, LOG_LEVEL=args.log_level)
        for k in kinds
    ]
    print_results(results)
    chart(results)
    print(f"written: {write_results('latency', {'results': results})}")


if __name__ == "__main__":
    main()
