"""Submission latency with an empty queue and with 100,000 waiting tasks.

The queue-limit check must cost the same at 0 and at 100,000 waiting tasks:
it is one conditional row update, never a COUNT(*). This benchmark measures
``POST /v1/tasks`` (echo) through gunicorn for one organization with nothing
waiting, then fills that organization to 100,000 waiting tasks (rows in SQL
and ids in its Redis waiting list, as submissions would leave them; no worker
runs, so nothing drains) and measures again. Target: p50 and p99 within 20%.

    python bench/queue_latency.py [--db sqlite|postgresql|both] [--requests 400] [--fill 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests
from sqlalchemy import insert, update

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import ids
from app.db import Database
from app.models import Organization, Task
from app.models.base import utcnow
from app.services.dispatch import waiting_key
from bench.harness import Platform, platform, summary, write_results


def measure(p: Platform, api_key: str, n: int) -> dict[str, float]:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {api_key}"
    for _ in range(20):  # warm-up: connections, caches
        s.post(p.base_url + "/v1/tasks", json={"type": "echo"}, timeout=30)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        r = s.post(p.base_url + "/v1/tasks", json={"type": "echo", "input": i}, timeout=30)
        times.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 202, r.text
    return summary(times)


def fill(p: Platform, org_id: str, count: int) -> float:
    started = time.monotonic()
    db = Database(p.database_url)
    import redis

    client = redis.Redis.from_url(p.redis.url)
    batch = 10_000
    for start in range(0, count, batch):
        now = utcnow()
        rows = [
            {
                "id": ids.task_id(),
                "organization_id": org_id,
                "type": "echo",
                "status": "queued",
                "input": {"n": start + i},
                "cost": 1,
                "refunded": False,
                "webhook_status": "none",
                "webhook_attempts": 0,
                "attempts": 0,
                "dispatched_at": now,
                "created_at": now,
            }
            for i in range(min(batch, count - start))
        ]
        with db.session() as s:
            s.execute(insert(Task), rows)
            s.execute(
                update(Organization)
                .where(Organization.id == org_id)
                .values(queued=Organization.queued + len(rows))
            )
        client.rpush(waiting_key(org_id), *[r["id"] for r in rows])
    db.dispose()
    return time.monotonic() - started


def run(db_kind: str, n: int, count: int) -> dict[str, object]:
    with platform(db_kind) as p:
        p.web()
        org_id, key = p.org("bench")
        empty = measure(p, key, n)
        fill_s = fill(p, org_id, count)
        full = measure(p, key, n)
    return {
        "db": db_kind,
        "waiting_0": empty,
        f"waiting_{count}": full,
        "fill_seconds": round(fill_s, 1),
        "p50_ratio": full["p50"] / empty["p50"],
        "p99_ratio": full["p99"] / empty["p99"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--fill", type=int, default=100_000)
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    results = [run(kind, args.requests, args.fill) for kind in kinds]
    print(f"\nSubmission latency (POST /v1/tasks, echo, one client, {args.requests} requests each)")
    print(f"{'db':<11} {'waiting':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for r in results:
        for label, key in (("0", "waiting_0"), (f"{args.fill:,}", f"waiting_{args.fill}")):
            s = r[key]
            assert isinstance(s, dict)
            print(f"{r['db']:<11} {label:>8} {s['p50']:>8.2f} {s['p99']:>8.2f}")
        print(
            f"{r['db']:<11} {'ratio':>8} {r['p50_ratio']:>8.2f} {r['p99_ratio']:>8.2f}"
            f"   (target: within 0.8-1.2; fill took {r['fill_seconds']} s)"
        )
    path = write_results("queue_latency", {"requests": args.requests, "fill": args.fill, "results": results})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
