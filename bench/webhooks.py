"""Webhook delivery throughput to a local receiver.

``--count`` echo tasks with a webhook to a receiver in this process are put
in the waiting list and run by the ``tasks`` worker while no webhook worker
runs, so that every ``task.succeeded`` delivery is recorded in SQL and its
Celery message waits in the ``webhooks`` queue. The ``tasks`` worker is then
stopped and the Procfile's ``webhooks`` worker (``--concurrency 4``) starts:
the rate is events received per second, from the first arrival past warm-up
to the last. Each delivery is the real path: claim in SQL, sign, POST (SSRF
checks, pinned address), record the attempt.

The sweep's grace is raised for this run (``SWEEP_GRACE_SECONDS=600``): with
the webhook worker held back on purpose, the sweep would otherwise publish
copies of the "overdue" deliveries, which is right in production but would
count the duplicates' work here.

    python bench/webhooks.py [--db sqlite|postgresql|both] [--count 1500]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.harness import DB_KINDS, platform, write_results
from bench.report import bar_chart, table
from tests.support import Receiver, answer_no_content, wait_for


def run(db_kind: str, *, count: int = 1500, timeout: float = 180.0, **env: str) -> dict[str, Any]:
    with platform(db_kind, SWEEP_GRACE_SECONDS="600", **env) as p, Receiver(answer_no_content) as hook:
        org_id = p.org("bench-webhooks", concurrency_limit=100).id
        # Dispatch steps and the sweep still run, on a maintenance-only worker.
        p.worker("maintenance", queues="maintenance", concurrency=1)
        p.beat()
        p.fill(org_id, count, webhook_url=hook.url + "/hook")
        tasks_worker = p.worker("worker", queues="tasks", concurrency=2)
        wait_for(
            lambda: p.count_status("succeeded") >= count, timeout, f"{count} tasks to succeed", interval=0.5
        )
        p.stop_one(tasks_worker)
        client = redis.Redis.from_url(p.redis.url)
        queued = int(client.llen("webhooks"))
        client.close()
        started = time.perf_counter()
        p.worker("webhooks", queues="webhooks", concurrency=4)
        with contextlib.suppress(TimeoutError):  # report what arrived; the table says how many
            wait_for(lambda: hook.task_count() >= count, timeout, f"{count} webhooks", interval=0.2)
        times = sorted(hook.times())
    received = len(times)
    # Skip the first 5% of arrivals: the pool's processes open their first
    # database and HTTP connections then.
    i0 = min(received - 1, received // 20) if received else 0
    span = times[-1] - times[i0] if received > 1 else float("nan")
    return {
        "db": db_kind,
        "count": count,
        "messages_queued": queued,
        "received": received,
        "unique_tasks": hook.task_count(),
        "rate_per_s": (received - 1 - i0) / span if received > 1 and span > 0 else float("nan"),
        "first_arrival_s": round(times[0] - started, 2) if times else float("nan"),
        "total_s": round(times[-1] - started, 2) if times else float("nan"),
    }


def print_results(results: list[dict[str, Any]]) -> None:
    table(
        "Webhook delivery throughput (webhooks worker, concurrency 4, local receiver)",
        ["db", "events", "received", "deliveries/s", "worker start -> last (s)"],
        [[r["db"], r["count"], r["received"], r["rate_per_s"], r["total_s"]] for r in results],
    )


def chart(results: list[dict[str, Any]]) -> None:
    bar_chart(
        "webhooks",
        "Webhook delivery throughput (deliveries/s)",
        [r["db"] for r in results],
        {"deliveries/s": [r["rate_per_s"] for r in results]},
        "deliveries/s",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=[*DB_KINDS, "both"], default="both")
    parser.add_argument("--count", type=int, default=1500)
    parser.add_argument("--log-level", default="INFO", help="Waybill's LOG_LEVEL (production default INFO)")
    args = parser.parse_args()
    kinds = list(DB_KINDS) if args.db == "both" else [args.db]
    results = [run(k, count=args.count, LOG_LEVEL=args.log_level) for k in kinds]
    print_results(results)
    chart(results)
    print(f"written: {write_results('webhooks', {'results': results})}")


if __name__ == "__main__":
    main()
