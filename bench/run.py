"""The whole benchmark suite (``make bench``): every benchmark, one table of targets, JSON and a chart.

Runs, on SQLite and on PostgreSQL (``BENCH_POSTGRES_URL``, default
``postgres@127.0.0.1:5432``), each in its own temporary platform on
127.0.0.1 (``bench/harness.py``):

* ``submission``     POST /v1/tasks vs a bare Flask + SQLAlchemy + Celery endpoint (1 and 2 gunicorn workers)
* ``processing``     echo queued -> succeeded vs raw Celery no-op (1 and 2 worker processes)
* ``latency``        idle submit -> succeeded (poll) and submit -> webhook vs a raw Celery round trip
* ``webhooks``       webhook deliveries/s to a local receiver
* ``queue_latency``  submission latency at 0 and at 100,000 waiting tasks of one organization
                     (and, in turn with it, of an organization with nothing waiting)
* ``versus``         Waybill vs a hand-written Flask + Celery version, the bare endpoint and raw
                     Celery, "lean" (processes started directly) and "as shipped" (``waybill run``):
                     submissions/s, batch tasks/s, submit -> finished tasks/s, idle webhook latency
                     (``bench/versus.py``; about 1.5 minutes per database and mode)
* ``memory``         peak RSS of web and Celery workers, growth after warm-up (PostgreSQL; it gets the
                     time left in the budget, up to ``--memory-tasks`` tasks)
* ``capacity``       per core: submissions, tasks and deliveries per CPU second, SQL commits, Redis
                     commands and broker messages per task, on the Redis and the RabbitMQ broker
                     (PostgreSQL; after memory, outside the budget, about 3 minutes; not in ``--quick``)

then prints every ratio against its target and writes ``bench/results/summary.json``
and ``summary.png`` (plus one JSON and PNG per benchmark).

    python bench/run.py                 # the full suite, about 17 minutes on 2 cores
                                        # (a 20-minute budget, memory taking what is left, then capacity)
    python bench/run.py --quick         # a smoke run: small counts, SQLite only, about 3 minutes
"""

from __future__ import annotations

import argparse
import math
import os
import platform as host
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import capacity, latency, memory, processing, queue_latency, submission, versus, webhooks
from bench.harness import DB_KINDS, write_results
from bench.report import Target, get, summary_chart, table

NAN = float("nan")


def sizes(quick: bool) -> dict[str, dict[str, Any]]:
    """Counts and windows per benchmark; ``--quick`` only checks that everything runs."""
    if quick:
        return {
            "submission": {"clients": 8, "window": 2.0, "rounds": 1, "web_workers": (2,)},
            "processing": {"concurrencies": (2,), "window": 2.0, "rounds": 1, "fill": 1000, "messages": 2000},
            "latency": {"samples": 15},
            "webhooks": {"count": 100},
            "queue_latency": {"n": 60, "count": 10_000},
            "memory": {"tasks": 600, "max_seconds": 18.0},
            "capacity": {"submissions": 300, "webhooks": 100, "background_s": 2.0},
            "versus": {**versus.sizes(quick=True), "modes": versus.MODES},
        }
    return {
        "submission": {"clients": 16, "window": 6.0, "rounds": 2, "web_workers": (2, 1)},
        "processing": {"concurrencies": (2, 1), "window": 5.0, "rounds": 2, "fill": 3000, "messages": 4000},
        "latency": {"samples": 100},
        "webhooks": {"count": 1000},
        "queue_latency": {"n": 400, "count": 100_000},
        "memory": {"tasks": 50_000, "max_seconds": 3600.0},
        "capacity": {"submissions": 1500, "webhooks": 400, "background_s": 5.0},
        "versus": {**versus.sizes(quick=False), "modes": versus.MODES},
    }


def attempt(name: str, db: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one benchmark; a failure is reported and the suite goes on with the next one."""
    print(f"\n=== {name} ({db}) ===", flush=True)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        out = fn()
    except Exception as exc:  # one broken benchmark must not hide the others' figures
        traceback.print_exc()
        out = {"db": db, "error": f"{type(exc).__name__}: {exc}"}
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    # The machine's 1-minute load average around each benchmark: on a shared
    # machine it tells which figures a neighbour's burst may have touched.
    out["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(
        f"--- {name} ({db}) took {out['elapsed_s']:.0f} s; load average {load_before:.2f} -> "
        f"{out['load_average'][1]:.2f}",
        flush=True,
    )
    return out


def targets_and_rows(results: dict[str, list[dict[str, Any]]]) -> tuple[list[Target], list[list[Any]]]:
    targets: list[Target] = []
    rows: list[list[Any]] = []

    def add(
        measure: str,
        db: str,
        waybill: float,
        baseline: float,
        target: Target | None,
        *,
        ratio: bool = True,
        note: str = "",
    ) -> None:
        if target is not None:
            targets.append(target)
            shown: Any = target.value
        elif ratio and baseline:
            shown = waybill / baseline
        else:
            shown = ""
        rows.append(
            [
                measure,
                db,
                waybill,
                baseline,
                shown,
                target.wanted if target else "",
                ("yes" if target.holds else "NO") if target else note,
            ]
        )

    for r in results.get("submission", []):
        db, w = r["db"], str(r.get("ratio_workers", 2))
        wb, base = (
            get(r, "by_workers", w, "waybill", "rate_per_s"),
            get(r, "by_workers", w, "baseline", "rate_per_s"),
        )
        add(
            f"submission req/s, {w} web procs",
            db,
            wb,
            base,
            Target(f"submission / bare ({db})", wb / base, low=0.7),
        )
        add(
            "submission scaling 1->2 web procs",
            db,
            get(r, "scaling_1_to_2", "waybill"),
            get(r, "scaling_1_to_2", "baseline"),
            None,
            ratio=False,
        )
    for r in results.get("processing", []):
        db, c = r["db"], str(r.get("ratio_concurrency", 2))
        wb, raw = get(r, "waybill", c, "rate_per_s"), get(r, "raw_celery", c, "rate_per_s")
        add(
            f"processing tasks/s, {c} procs",
            db,
            wb,
            raw,
            Target(f"processing / raw Celery ({db})", wb / raw, low=0.6),
        )
        add(
            "processing scaling 1->2 procs",
            db,
            get(r, "waybill", "scaling_1_to_2"),
            get(r, "raw_celery", "scaling_1_to_2"),
            None,
            ratio=False,
        )
    for r in results.get("latency", []):
        db = r["db"]
        wb, raw = get(r, "webhook", "p50"), get(r, "raw_celery", "p50")
        add(
            "idle submit->webhook p50 ms",
            db,
            wb,
            raw,
            Target(f"webhook p50 / raw Celery ({db})", wb / raw, high=3.0),
        )
        add("idle submit->succeeded (poll) p50 ms", db, get(r, "poll", "p50"), raw, None)
    for r in results.get("webhooks", []):
        add("webhook deliveries/s", r["db"], get(r, "rate_per_s"), NAN, None, ratio=False)
    for r in results.get("queue_latency", []):
        db = r["db"]
        full_key = next((k for k in r if k.startswith("waiting_") and k != "waiting_0"), "")
        waiting = f"{int(full_key.removeprefix('waiting_')):,}" if full_key else "?"
        p50_full, p50_beside = get(r, full_key, "p50"), get(r, "same_time_0", "p50")
        add(
            f"submit p50 ms, {waiting} vs 0 waiting (in turn)",
            db,
            p50_full,
            p50_beside,
            Target(f"submit p50, {waiting} / 0 waiting ({db})", p50_full / p50_beside, low=0.8, high=1.2),
        )
        # p99 of a few hundred requests is about the 4th slowest: on a shared
        # machine it is mostly noise, so it is shown but the target is on p50.
        add("submit p99 ms, same (in turn)", db, get(r, full_key, "p99"), get(r, "same_time_0", "p99"), None)
        add(
            "submit p50 ms, full vs empty database (before/after)",
            db,
            p50_full,
            get(r, "waiting_0", "p50"),
            None,
        )
        add(
            "submit p50 ms, same after ANALYZE (in turn)",
            db,
            get(r, "analyzed", full_key, "p50"),
            get(r, "analyzed", "same_time_0", "p50"),
            None,
        )
    for r in results.get("versus", []):
        if "error" in r:
            continue
        db = f"{r['db']}, {r['mode']}"
        for x in versus.rows(r):
            measure = f"{x['measure']} vs {x['reference']}"
            spec = x["target"]
            if spec is None:
                add(measure, db, x["waybill"], x["baseline"], None)
            elif "unavailable" in x:
                add(measure, db, x["waybill"], x["baseline"], None, ratio=False, note="n/a")
            else:
                t = Target(f"{spec[1]} ({db})", x["ratio"], low=spec[2], high=spec[3])
                add(measure, db, x["waybill"], x["baseline"], t)
    for r in results.get("memory", []):
        db = r["db"]
        growth = 100 * get(r, "max_growth")
        done = int(get(r, "tasks_succeeded")) if "tasks_succeeded" in r else 0
        add(
            f"memory growth % after warm-up ({done:,} tasks)",
            db,
            growth,
            NAN,
            Target(f"memory growth % ({db})", growth, high=100 * memory.GROWTH_LIMIT),
        )
        add(
            "peak RSS MiB: web worker | celery pool",
            db,
            get(r, "web_peak_mib"),
            get(r, "celery_peak_mib"),
            None,
            ratio=False,
        )
    return targets, rows


# One chart panel: title, y label, the groups along x, and one bar series per name.
Panel = tuple[str, str, Sequence[str], Mapping[str, Sequence[float]]]


def panels(results: dict[str, list[dict[str, Any]]]) -> list[Panel]:
    out: list[Panel] = []
    sub = results.get("submission", [])
    if sub:
        groups, a, b = [], [], []
        for r in sub:
            for w in sorted(r.get("by_workers", {}), reverse=True):
                groups.append(f"{r['db']}\n{w} web procs")
                a.append(get(r, "by_workers", w, "waybill", "rate_per_s"))
                b.append(get(r, "by_workers", w, "baseline", "rate_per_s"))
        out.append(("submission (req/s)", "req/s", groups, {"waybill": a, "bare baseline": b}))
    proc = results.get("processing", [])
    if proc:
        groups, a, b = [], [], []
        for r in proc:
            for c in sorted((k for k in r.get("waybill", {}) if k.isdigit()), reverse=True):
                groups.append(f"{r['db']}\nconcurrency {c}")
                a.append(get(r, "waybill", c, "rate_per_s"))
                b.append(get(r, "raw_celery", c, "rate_per_s"))
        out.append(("processing (tasks/s)", "tasks/s", groups, {"waybill echo": a, "raw celery": b}))
    lat = results.get("latency", [])
    if lat:
        kinds = ("poll", "webhook", "raw_celery")
        out.append(
            (
                "idle latency p50 / p99 (ms)",
                "ms",
                [f"{r['db']}\n{k}" for r in lat for k in kinds],
                {
                    "p50": [get(r, k, "p50") for r in lat for k in kinds],
                    "p99": [get(r, k, "p99") for r in lat for k in kinds],
                },
            )
        )
    ql = results.get("queue_latency", [])
    if ql:
        groups, p50, p99 = [], [], []
        for r in ql:
            full_key = next((k for k in r if k.startswith("waiting_") and k != "waiting_0"), "")
            for label, k in (
                ("0 (empty db)", "waiting_0"),
                ("full", full_key),
                ("0 (in turn)", "same_time_0"),
            ):
                groups.append(f"{r['db']}\n{label}")
                p50.append(get(r, k, "p50"))
                p99.append(get(r, k, "p99"))
        out.append(("submission latency vs waiting tasks (ms)", "ms", groups, {"p50": p50, "p99": p99}))
    vs = [r for r in results.get("versus", []) if "error" not in r]
    if vs:
        out.append(
            (
                "submit -> finished, no webhook (tasks/s)",
                "tasks/s",
                [f"{r['db']}\n{r['mode']}" for r in vs],
                {
                    side: [get(r, "end_to_end", key, "rate_per_s") for r in vs]
                    for side, key in (
                        ("waybill", "waybill"),
                        ("hand-written", "handwritten"),
                        ("raw celery", "raw_celery"),
                    )
                },
            )
        )
    wh = results.get("webhooks", [])
    mem = results.get("memory", [])
    if wh:
        out.append(
            (
                "webhook deliveries/s",
                "deliveries/s",
                [r["db"] for r in wh],
                {"rate": [get(r, "rate_per_s") for r in wh]},
            )
        )
    if mem:
        groups, warm, end = [], [], []
        for r in mem:
            for name, v in r.get("processes", {}).items():
                groups.append(f"{r['db']}\n{name}")
                warm.append(v["peak_at_warmup_mib"])
                end.append(v["peak_rss_mib"])
        out.append(("peak RSS (MiB)", "MiB", groups, {"after warm-up": warm, "at the end": end}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts, SQLite only (< 2 minutes)")
    parser.add_argument("--db", choices=[*DB_KINDS, "both"], help="default: both (sqlite with --quick)")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        # 14 minutes before versus (about 6) came in: memory keeps the time
        # it needs for its 50,000 tasks on a quiet 2-core machine.
        default=20.0,
        help="time budget of the whole run (memory takes the rest)",
    )
    parser.add_argument("--memory-tasks", type=int, help="tasks for the memory benchmark (default 50,000)")
    parser.add_argument("--memory-db", choices=DB_KINDS, help="default: postgresql (sqlite with --quick)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[
            "submission",
            "processing",
            "latency",
            "webhooks",
            "queue_latency",
            "versus",
            "memory",
            "capacity",
        ],
        help="run only these benchmarks (capacity: PostgreSQL, Redis and RabbitMQ brokers; not in --quick)",
    )
    parser.add_argument("--log-level", default="INFO", help="Waybill's LOG_LEVEL (production default INFO)")
    args = parser.parse_args()

    started_at = datetime.now(UTC)
    started = time.monotonic()
    deadline = started + args.budget_minutes * 60
    size = sizes(args.quick)
    if args.memory_tasks:
        size["memory"]["tasks"] = args.memory_tasks
    kinds = (
        ["sqlite"]
        if args.quick and not args.db
        else list(DB_KINDS)
        if args.db in (None, "both")
        else [args.db]
    )
    memory_db = args.memory_db or ("sqlite" if args.quick else "postgresql")
    if memory_db not in kinds and args.db not in (None, "both"):
        memory_db = kinds[0]
    wanted = set(
        args.only or ["submission", "processing", "latency", "webhooks", "queue_latency", "versus", "memory"]
    )
    if not args.quick and not args.only:
        wanted.add("capacity")  # after memory, outside its budget: about 3 minutes more
    env = {"LOG_LEVEL": args.log_level}
    load_before = os.getloadavg()
    print(
        f"Waybill benchmarks ({'quick' if args.quick else 'full'}): databases {', '.join(kinds)}; "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} at start",
        flush=True,
    )

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in wanted}
    ql_n, ql_count = size["queue_latency"]["n"], size["queue_latency"]["count"]
    for db in kinds:
        if "submission" in wanted:
            results["submission"].append(
                attempt("submission", db, partial(submission.run, db, **size["submission"], **env))
            )
        if "processing" in wanted:
            results["processing"].append(
                attempt("processing", db, partial(processing.run, db, **size["processing"], **env))
            )
        if "latency" in wanted:
            results["latency"].append(
                attempt("latency", db, partial(latency.run, db, **size["latency"], **env))
            )
        if "webhooks" in wanted:
            results["webhooks"].append(
                attempt("webhooks", db, partial(webhooks.run, db, **size["webhooks"], **env))
            )
        if "queue_latency" in wanted:
            results["queue_latency"].append(
                attempt("queue_latency", db, partial(queue_latency.run, db, ql_n, ql_count, **env))
            )
        if "versus" in wanted:
            vs_size = {k: v for k, v in size["versus"].items() if k != "modes"}
            for mode in size["versus"]["modes"]:
                results["versus"].append(
                    attempt("versus", f"{db}, {mode}", partial(versus.run, db, mode, **vs_size, **env))
                )
    if "memory" in wanted:
        # Whatever is left of the budget, less a margin for stopping and the report.
        left = deadline - time.monotonic() - 45
        budget = max(20.0, min(size["memory"]["max_seconds"], left))
        print(f"\nmemory: up to {size['memory']['tasks']:,} tasks within {budget:.0f} s", flush=True)
        results["memory"].append(
            attempt(
                "memory",
                memory_db,
                partial(memory.run, memory_db, tasks=size["memory"]["tasks"], max_seconds=budget, **env),
            )
        )

    if "capacity" in wanted:
        for broker in capacity.available():
            results["capacity"].append(
                attempt(
                    "capacity",
                    f"postgresql, {broker} broker",
                    partial(capacity.run, broker, **size["capacity"], **env),
                )
            )

    # Each benchmark's own table, JSON and chart, then the summary.
    printers: dict[str, Any] = {
        "submission": submission,
        "processing": processing,
        "latency": latency,
        "webhooks": webhooks,
        "memory": memory,
    }
    for name, module in printers.items():
        good = [r for r in results.get(name, []) if "error" not in r]
        if good:
            module.print_results(good)
            module.chart(good)
            write_results(name, {"results": good})
    vs = [r for r in results.get("versus", []) if "error" not in r]
    if vs:
        versus.print_results(vs)
        versus.chart(vs)
        write_results("versus", {"results": vs})
    cap = [r for r in results.get("capacity", []) if "error" not in r]
    if cap:
        capacity.print_results(cap)
        write_results("capacity", {"results": cap})
    ql = [r for r in results.get("queue_latency", []) if "error" not in r]
    if ql:
        queue_latency.print_results(ql, ql_n, ql_count)
        queue_latency.chart(ql, ql_count)
        write_results("queue_latency", {"requests": ql_n, "fill": ql_count, "results": ql})

    targets, rows = targets_and_rows(results)
    duration = time.monotonic() - started
    table(
        "Summary: Waybill against its baselines (same machine, same run)",
        ["measure", "db", "waybill", "baseline", "ratio", "target", "holds"],
        rows,
        digits=2,
    )
    failed = {name: [r["error"] for r in rs if "error" in r] for name, rs in results.items()}
    failed = {k: v for k, v in failed.items() if v}
    for name, errors in failed.items():
        print(f"FAILED {name}: {'; '.join(errors)}")
    held = sum(t.holds for t in targets)
    load_after = os.getloadavg()
    print(
        f"\n{held} of {len(targets)} targets hold. Run took {duration / 60:.1f} min; "
        f"load average {load_before[0]:.2f} at start, {load_after[0]:.2f} at the end "
        f"({os.cpu_count()} CPUs)."
    )
    summary = {
        "mode": "quick" if args.quick else "full",
        "started_at": started_at.isoformat(),
        "duration_s": round(duration, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_start": load_before,
            "load_average_end": load_after,
            "python": sys.version.split()[0],
            "platform": host.platform(),
        },
        "sizes": size,
        "targets": [
            {
                "target": t.label,
                "value": None if math.isnan(t.value) else t.value,
                "wanted": t.wanted,
                "holds": t.holds,
            }
            for t in targets
        ],
        "table": [
            dict(zip(["measure", "db", "waybill", "baseline", "ratio", "target", "holds"], r, strict=True))
            for r in rows
        ],
        "failed": failed,
        "results": results,
    }
    path = write_results("summary", summary)
    png = summary_chart("summary", targets, panels(results))
    print(f"written: {path}" + (f", {png}" if png else "") + " (and one JSON and PNG per benchmark)")


if __name__ == "__main__":
    main()
