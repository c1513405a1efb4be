"""How long a newcomer's first task waits behind another organization's backlog.

Organization A holds 10,000 waiting ``sleep`` tasks of ``--duration`` seconds
with two worker processes busy on them; organization B then submits one task
at a time. We report how long each B task waited from submission to start,
as a multiple of one task's duration. With fair dispatch it is about one
task-duration per busy organization (plus the few messages already in
Celery's queue), not the 10,000 x duration / 2 a single FIFO queue would
give.

    python bench/fairness.py [--backlog 10000] [--duration 0.2] [--trials 5] [--db sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import platform, summary, write_results


def submit_many(base: str, key: str, body: dict, count: int, threads: int = 16) -> None:
    local = threading.local()

    def post(_: int) -> None:
        if not hasattr(local, "s"):
            local.s = requests.Session()
            local.s.headers["Authorization"] = f"Bearer {key}"
        r = local.s.post(base + "/v1/tasks", json=body, timeout=60)
        assert r.status_code == 202, r.text

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, range(count)))


def parse(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=0.2)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    with platform(args.db, DISPATCH_QUEUE_TARGET="4") as p:
        p.web(threads=16)
        p.worker(queues="tasks", concurrency=2)
        p.worker("maintenance", queues="webhooks,maintenance", concurrency=2)
        p.beat()
        a_key = p.org("A", concurrency_limit=100).api_key
        b_key = p.org("B").api_key
        started = time.monotonic()
        submit_many(p.base_url, a_key, {"type": "sleep", "input": {"seconds": args.duration}}, args.backlog)
        fill_s = time.monotonic() - started
        b = requests.Session()
        b.headers["Authorization"] = f"Bearer {b_key}"
        waits = []
        for _ in range(args.trials):
            r = b.post(
                p.base_url + "/v1/tasks",
                json={"type": "sleep", "input": {"seconds": args.duration}},
                timeout=30,
            )
            task = r.json()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                task = b.get(f"{p.base_url}/v1/tasks/{task['taskId']}", timeout=30).json()
                if task["startedAt"]:
                    break
                time.sleep(0.02)
            waits.append((parse(task["startedAt"]) - parse(task["createdAt"])) / args.duration)
            b.get(f"{p.base_url}/v1/tasks/{task['taskId']}", headers={"Prefer": "wait=30"}, timeout=60)
        a_view = requests.get(
            p.base_url + "/v1/organization", headers={"Authorization": f"Bearer {a_key}"}, timeout=10
        ).json()
    stats = summary(waits)
    fifo = a_view["queued"] / 2  # two workers draining one FIFO queue, in task durations
    print(f"\nFairness: B's task wait, in task durations ({args.duration}s)")
    print(f"with A holding ~{a_view['queued']:,} waiting tasks")
    print(f"{'trials':>6} {'p50':>6} {'max':>6}   single FIFO queue would be ~{fifo:,.0f}")
    print(f"{stats['n']:>6} {stats['p50']:>6.2f} {max(waits):>6.2f}")
    path = write_results(
        "fairness",
        {
            "db": args.db,
            "duration_s": args.duration,
            "a_waiting": a_view["queued"],
            "fill_seconds": fill_s,
            "wait_in_durations": waits,
            "summary": stats,
            "fifo_equivalent": fifo,
        },
    )
    print(f"written: {path}")


if __name__ == "__main__":
    main()
