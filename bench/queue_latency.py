"""Submission latency with an empty queue and with 100,000 waiting tasks.

The queue-limit check must cost the same at 0 and at 100,000 waiting tasks:
it is one conditional row update, never a COUNT(*). This benchmark measures
``POST /v1/tasks`` (echo) through ``waybill serve`` for one organization
with nothing waiting, then fills that organization to 100,000 waiting tasks
(rows in SQL and ids in its Redis waiting list, as submissions would leave
them, see ``Platform.fill``; no worker runs, so nothing drains) and measures
again, taking turns with a second organization that has nothing waiting, so
that both figures come from the same moment on a shared machine. Target: the
p50 with 100,000 waiting within 20% of the p50 with none (p99 is shown; of a
few hundred requests it is the 4th slowest, mostly noise). A last round runs
after ``ANALYZE``: the first figures are what a burst meets before autovacuum
has seen the grown table, the last ones the steady state.

    python bench/queue_latency.py [--db sqlite|postgresql|both] [--requests 400] [--fill 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Platform, platform, summary, write_results
from bench.report import bar_chart, table


def session_for(api_key: str) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {api_key}"
    return s


def post(p: Platform, s: requests.Session, i: int) -> float:
    t0 = time.perf_counter()
    r = s.post(p.base_url + "/v1/tasks", json={"type": "echo", "input": i}, timeout=30)
    elapsed = (time.perf_counter() - t0) * 1000
    assert r.status_code == 202, r.text
    return elapsed


def measure(p: Platform, api_key: str, n: int) -> dict[str, float]:
    s = session_for(api_key)
    for _ in range(20):  # warm-up: connections, caches
        s.post(p.base_url + "/v1/tasks", json={"type": "echo"}, timeout=30)
    return summary([post(p, s, i) for i in range(n)])


def measure_interleaved(p: Platform, keys: list[str], n: int) -> list[dict[str, float]]:
    """``n`` requests for each key, taking turns request by request: the same moment for all."""
    sessions = [session_for(k) for k in keys]
    for s in sessions:
        for _ in range(20):
            s.post(p.base_url + "/v1/tasks", json={"type": "echo"}, timeout=30)
    times: list[list[float]] = [[] for _ in keys]
    for i in range(n):
        for k, s in enumerate(sessions):
            times[k].append(post(p, s, i))
    return [summary(t) for t in times]


def run(db_kind: str, n: int, count: int, **env: str) -> dict[str, object]:
    """Organization A alone on an empty database; then A with ``count`` waiting beside B with none.

    The second phase takes A's and B's requests in turn, so both see the
    same moment of the machine (and the same, larger, tables): their ratio is
    what a long queue costs one organization, free of a neighbour's bursts
    between the phases. The first-phase figure is kept for the before/after view.
    """
    with platform(db_kind, **env) as p:
        p.serve()
        a = p.org("bench-a")
        a_id, a_key = a.id, a.api_key
        b_key = p.org("bench-b").api_key
        empty = measure(p, a_key, n)
        fill_s = p.fill(a_id, count)
        full, beside = measure_interleaved(p, [a_key, b_key], n)
        # Then once more after ANALYZE: the figures above are what a burst
        # meets before autovacuum has looked at the grown table (statement
        # plans cached while it was small still apply); these are the
        # steady state.
        with p.probe_engine().connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()
        full_analyzed, beside_analyzed = measure_interleaved(p, [a_key, b_key], max(1, n // 2))
    return {
        "db": db_kind,
        "waiting_0": empty,
        f"waiting_{count}": full,
        "same_time_0": beside,
        "fill_seconds": round(fill_s, 1),
        "p50_ratio": full["p50"] / beside["p50"],
        "p99_ratio": full["p99"] / beside["p99"],
        "before_after_p50_ratio": full["p50"] / empty["p50"],
        "before_after_p99_ratio": full["p99"] / empty["p99"],
        "analyzed": {
            f"waiting_{count}": full_analyzed,
            "same_time_0": beside_analyzed,
            "p50_ratio": full_analyzed["p50"] / beside_analyzed["p50"],
            "p99_ratio": full_analyzed["p99"] / beside_analyzed["p99"],
        },
    }


def print_results(results: list[dict[str, Any]], n: int, fill: int) -> None:
    rows: list[list[Any]] = []
    for r in results:
        full = r[f"waiting_{fill}"]
        rows.append([r["db"], "A, 0 waiting (empty database)", r["waiting_0"]["p50"], r["waiting_0"]["p99"]])
        rows.append([r["db"], f"A, {fill:,} waiting", full["p50"], full["p99"]])
        rows.append(
            [r["db"], "B, 0 waiting (in turn with A)", r["same_time_0"]["p50"], r["same_time_0"]["p99"]]
        )
        rows.append([r["db"], "ratio A full / B (target)", r["p50_ratio"], r["p99_ratio"]])
        rows.append(
            [r["db"], "ratio A full / A empty", r["before_after_p50_ratio"], r["before_after_p99_ratio"]]
        )
        an = r["analyzed"]
        an_full, an_beside = an[f"waiting_{fill}"], an["same_time_0"]
        rows.append([r["db"], f"after ANALYZE: A, {fill:,} waiting", an_full["p50"], an_full["p99"]])
        rows.append([r["db"], "after ANALYZE: B, 0 waiting", an_beside["p50"], an_beside["p99"]])
        rows.append([r["db"], "after ANALYZE: ratio A / B", an["p50_ratio"], an["p99_ratio"]])
    table(
        f"Submission latency, ms (POST /v1/tasks, echo, one client, {n} requests each)   target: 0.8..1.2",
        ["db", "organization", "p50", "p99"],
        rows,
        digits=2,
    )


def chart(results: list[dict[str, Any]], fill: int) -> None:
    groups, p50, p99 = [], [], []
    for r in results:
        for label, key in (
            ("A 0 waiting\n(empty db)", "waiting_0"),
            (f"A {fill:,}\nwaiting", f"waiting_{fill}"),
            ("B 0 waiting\n(same time)", "same_time_0"),
        ):
            groups.append(f"{r['db']}\n{label}")
            p50.append(r[key]["p50"])
            p99.append(r[key]["p99"])
    bar_chart(
        "queue_latency", "Submission latency vs waiting tasks (ms)", groups, {"p50": p50, "p99": p99}, "ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--fill", type=int, default=100_000)
    parser.add_argument("--log-level", default="INFO", help="Waybill's LOG_LEVEL (production default INFO)")
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    results = [run(kind, args.requests, args.fill, LOG_LEVEL=args.log_level) for kind in kinds]
    print_results(results, args.requests, args.fill)
    chart(results, args.fill)
    path = write_results("queue_latency", {"requests": args.requests, "fill": args.fill, "results": results})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
