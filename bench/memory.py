"""Memory: peak RSS of a web worker and of a Celery worker over many tasks, and growth after warm-up.

Every Procfile process runs; ``--clients`` clients (2: about what the worker
keeps up with here, so the run ends with the tasks run, not just queued) submit echo tasks through
``waybill serve`` (2 gunicorn workers) while the ``tasks`` worker (2 pool
processes) runs them, until ``--tasks`` tasks were submitted or
``--max-seconds`` passed (then it waits, within the same budget, for the
worker to catch up). Each process's peak RSS is the kernel's high-water mark
(``VmHWM`` in ``/proc/PID/status``): nothing between two samples is missed.

Warm-up is the first ``--warmup`` fraction of the run's tasks (20%): caches,
connection pools and the allocator's arenas fill then. Growth is the peak
after warm-up over the peak at the end of warm-up; target: no growth (we
allow 5% for allocator noise), for every web worker and every pool process.

On two busy cores the default 50,000 tasks takes longer than ``make bench``
may; ``bench/run.py`` gives this benchmark the time left in its budget and
the report says how many tasks it reached.

    python bench/memory.py [--db sqlite|postgresql] [--tasks 50000] [--max-seconds 3600]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from bench.harness import DB_KINDS, Platform, platform, write_results
from bench.load import LoadResult, hammer, rss_mib, wait_children
from bench.report import bar_chart, table

GROWTH_LIMIT = 0.05


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), MiB; its current RSS where /proc has no such line."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss_mib(pid)


def counts(p: Platform) -> tuple[int, int]:
    """(submitted, succeeded) from SQL."""
    engine = p.probe_engine()
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT count(*), coalesce(sum(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END), 0)"
                " FROM tasks"
            )
        ).one()
    return int(row[0]), int(row[1])


def run(
    db_kind: str,
    *,
    tasks: int = 50_000,
    max_seconds: float = 3600.0,
    clients: int = 2,
    warmup: float = 0.2,
    interval: float = 1.0,
    **env: str,
) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + max_seconds
    samples: list[dict[str, Any]] = []
    with platform(db_kind, **env) as p:
        web = p.serve(workers=2)
        worker = p.worker("worker", queues="tasks", concurrency=2)
        p.worker("webhooks", queues="webhooks,maintenance", concurrency=4)
        p.beat()
        key = p.org("bench-memory", queue_limit=10_000_000, credits=10_000_000).api_key
        load: dict[str, LoadResult] = {}

        def submit() -> None:
            load["result"] = hammer(
                p.base_url + "/v1/tasks",
                lambda i: {"type": "echo", "input": {"n": i}},
                clients=clients,
                total=tasks,
                max_seconds=max(1.0, deadline - time.monotonic()),
                headers={"Authorization": f"Bearer {key}"},
            )

        submitter = threading.Thread(target=submit, daemon=True)
        submitter.start()
        web_pids = wait_children(web.pid, 2)
        pool_pids = wait_children(worker.pid, 2)
        procs = {f"web worker {i + 1}": pid for i, pid in enumerate(web_pids)}
        procs["celery main"] = worker.pid
        procs.update({f"celery pool {i + 1}": pid for i, pid in enumerate(pool_pids)})
        # Sample until the submissions are done and the worker has caught up,
        # or the budget is spent: bounded by time whatever happens.
        while time.monotonic() < deadline:
            submitted, succeeded = counts(p)
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "submitted": submitted,
                    "succeeded": succeeded,
                    "rss": {name: rss_mib(pid) for name, pid in procs.items()},
                    "peak": {name: peak_rss_mib(pid) for name, pid in procs.items()},
                }
            )
            if not submitter.is_alive() and succeeded >= submitted:
                break
            time.sleep(interval)
        submitter.join(5)
    submitted, succeeded = samples[-1]["submitted"], samples[-1]["succeeded"]
    out: dict[str, Any] = {
        "db": db_kind,
        "tasks_asked": tasks,
        "tasks_submitted": submitted,
        "tasks_succeeded": succeeded,
        "seconds": round(time.monotonic() - started, 1),
        "budget_s": max_seconds,
        "submission_errors": load["result"].errors if "result" in load else None,
        "processes": {},
        "samples": samples,
    }
    for name in procs:
        # Progress of the process's own work: submissions for the web,
        # tasks run for Celery.
        key_count = "submitted" if name.startswith("web") else "succeeded"
        total = samples[-1][key_count]
        warm = next((s for s in samples if s[key_count] >= warmup * total and s[key_count] > 0), samples[-1])
        at_warm, end = warm["peak"][name], samples[-1]["peak"][name]
        out["processes"][name] = {
            "peak_rss_mib": round(end, 1),
            "peak_at_warmup_mib": round(at_warm, 1),
            "rss_end_mib": round(samples[-1]["rss"][name], 1),
            "growth": (end - at_warm) / at_warm if at_warm else float("nan"),
            "warmup_tasks": warm[key_count],
        }
    procs_out = out["processes"]
    out["max_growth"] = max((v["growth"] for v in procs_out.values()), default=float("nan"))
    out["web_peak_mib"] = max(
        (v["peak_rss_mib"] for k, v in procs_out.items() if k.startswith("web")), default=0
    )
    out["celery_peak_mib"] = max(
        (v["peak_rss_mib"] for k, v in procs_out.items() if k.startswith("celery pool")), default=0
    )
    return out


def print_results(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        for name, v in r["processes"].items():
            rows.append(
                [
                    r["db"],
                    name,
                    v["peak_at_warmup_mib"],
                    v["peak_rss_mib"],
                    100 * v["growth"],
                    v["warmup_tasks"],
                ]
            )
    table(
        "Memory: peak RSS (MiB) at the end of warm-up and at the end   target: growth <= 5%",
        ["db", "process", "peak at warm-up", "peak at end", "growth %", "warm-up tasks"],
        rows,
    )
    for r in results:
        print(
            f"{r['db']}: {r['tasks_submitted']:,} tasks submitted, {r['tasks_succeeded']:,} succeeded "
            f"(asked {r['tasks_asked']:,}) in {r['seconds']:.0f} s"
        )


def chart(results: list[dict[str, Any]]) -> None:
    groups, warm, end = [], [], []
    for r in results:
        for name, v in r["processes"].items():
            groups.append(f"{r['db']}\n{name}")
            warm.append(v["peak_at_warmup_mib"])
            end.append(v["peak_rss_mib"])
    bar_chart("memory", "Peak RSS (MiB)", groups, {"after warm-up": warm, "at the end": end}, "MiB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=[*DB_KINDS, "both"], default="postgresql")
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--log-level", default="INFO", help="Waybill's LOG_LEVEL (production default INFO)")
    args = parser.parse_args()
    kinds = list(DB_KINDS) if args.db == "both" else [args.db]
    results = [
        run(k, tasks=args.tasks, max_seconds=args.max_seconds, clients=args.clients, LOG_LEVEL=args.log_level)
        for k in kinds
    ]
    print_results(results)
    chart(results)
    print(f"written: {write_results('memory', {'results': results})}")


if __name__ == "__main__":
    main()
