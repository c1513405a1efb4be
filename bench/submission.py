"""Submission throughput: ``POST /v1/tasks`` (echo) against a bare Flask + SQLAlchemy + Celery endpoint.

Waybill's web process runs exactly as the Procfile's ``web: waybill serve``
line (gunicorn, ``app.gunicorn_conf``, ``--threads 16``); the baseline
(``bench/baseline_app.py``: insert one row, ``apply_async`` a no-op) runs
under gunicorn with the same flags, on the same database and Redis. No
worker runs: this is the cost of accepting a task, nothing else.

``--clients`` threads with keep-alive sessions send requests for ``--window``
seconds per round; Waybill and the baseline take turns for ``--rounds``
rounds so that a noisy neighbour on the machine weighs on both alike. This
is done with 2 and with 1 gunicorn worker processes (item 3 of the issue).

Target: Waybill >= 0.7 x the baseline (2 worker processes).

    python bench/submission.py [--db sqlite|postgresql|both] [--clients 16] [--window 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import DB_KINDS, Platform, platform, summary, write_results
from bench.load import LoadResult, hammer
from bench.report import bar_chart, table


def body(i: int) -> dict[str, Any]:
    return {"type": "echo", "input": {"n": i}}


def combine(parts: list[LoadResult]) -> dict[str, Any]:
    ok = sum(r.ok for r in parts)
    seconds = sum(r.seconds for r in parts)
    latencies = [x for r in parts for x in r.latencies_ms]
    return {
        "ok": ok,
        "errors": sum(r.errors for r in parts),
        "seconds": round(seconds, 3),
        "rate_per_s": ok / seconds if seconds else float("nan"),
        "latency_ms": summary(latencies),
        "first_error": next((r.first_error for r in parts if r.first_error), ""),
    }


def measure(
    p: Platform,
    keys: list[str],
    workers: int,
    *,
    clients: int,
    window: float,
    rounds: int,
    max_requests: int,
) -> dict[str, Any]:
    web = p.serve(workers=workers)
    base = p.baseline_web(workers=workers)
    targets: dict[str, tuple[str, list[dict[str, str]]]] = {
        "waybill": (p.base_url + "/v1/tasks", [{"Authorization": f"Bearer {k}"} for k in keys]),
        "baseline": (p.baseline_url + "/baseline/tasks", [{}]),
    }
    try:
        # Warm-up, not counted: every gunicorn worker and thread has served,
        # the connection pools are full, the first SQLite checkpoint is past.
        for url, headers in targets.values():
            hammer(url, body, clients=clients, total=clients * 10, max_seconds=window, headers=headers)
        parts: dict[str, list[LoadResult]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (url, headers) in targets.items():
                parts[name].append(
                    hammer(
                        url, body, clients=clients, total=max_requests, max_seconds=window, headers=headers
                    )
                )
    finally:
        p.stop_one(web)
        p.stop_one(base)
    out = {name: combine(results) for name, results in parts.items()}
    out["ratio"] = out["waybill"]["rate_per_s"] / out["baseline"]["rate_per_s"]
    return out


def run(
    db_kind: str,
    *,
    clients: int = 16,
    window: float = 8.0,
    rounds: int = 2,
    web_workers: tuple[int, ...] = (2, 1),
    max_requests: int = 50_000,
    orgs: int = 1,
    **env: str,
) -> dict[str, Any]:
    """``orgs`` > 1 spreads the clients over that many organizations (one is the issue's case)."""
    results: dict[str, Any] = {"db": db_kind, "clients": clients, "orgs": orgs, "by_workers": {}}
    with platform(db_kind, **env) as p:
        keys = [p.org(f"bench-submission-{i}", queue_limit=10_000_000).api_key for i in range(orgs)]
        for w in web_workers:
            results["by_workers"][str(w)] = measure(
                p, keys, w, clients=clients, window=window, rounds=rounds, max_requests=max_requests
            )
    by = results["by_workers"]
    top = str(max(web_workers))
    results["ratio"] = by[top]["ratio"]
    results["ratio_workers"] = int(top)
    if "1" in by and "2" in by:
        results["scaling_1_to_2"] = {
            side: by["2"][side]["rate_per_s"] / by["1"][side]["rate_per_s"]
            for side in ("waybill", "baseline")
        }
    return results


def print_results(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        for w, m in sorted(r["by_workers"].items(), reverse=True):
            rows.append(
                [
                    r["db"],
                    int(w),
                    m["waybill"]["rate_per_s"],
                    m["baseline"]["rate_per_s"],
                    m["ratio"],
                    m["waybill"]["latency_ms"]["p50"],
                    m["baseline"]["latency_ms"]["p50"],
                    m["waybill"]["errors"] + m["baseline"]["errors"],
                ]
            )
        if "scaling_1_to_2" in r:
            sc = r["scaling_1_to_2"]
            rows.append([r["db"], "1->2", sc["waybill"], sc["baseline"], "", "", "", ""])
    table(
        f"Submission throughput, requests/s ({results[0]['clients']} clients, "
        f"{results[0].get('orgs', 1)} organization(s))   target >= 0.7",
        ["db", "gunicorn workers", "waybill", "baseline", "ratio", "waybill p50 ms", "base p50 ms", "errors"],
        rows,
        digits=2,
    )


def chart(results: list[dict[str, Any]]) -> None:
    groups, waybill, base = [], [], []
    for r in results:
        for w, m in sorted(r["by_workers"].items(), reverse=True):
            groups.append(f"{r['db']}\n{w} worker(s)")
            waybill.append(m["waybill"]["rate_per_s"])
            base.append(m["baseline"]["rate_per_s"])
    bar_chart(
        "submission",
        "Submission throughput (requests/s)",
        groups,
        {"waybill POST /v1/tasks": waybill, "bare Flask baseline": base},
        "requests/s",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=[*DB_KINDS, "both"], default="both")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--window", type=float, default=8.0, help="seconds per measured round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--web-workers", type=int, nargs="+", default=[2, 1])
    parser.add_argument(
        "--orgs", type=int, default=1, help="spread the clients over this many organizations (default 1)"
    )
    parser.add_argument("--log-level", default="INFO", help="Waybill's LOG_LEVEL (production default INFO)")
    args = parser.parse_args()
    kinds = list(DB_KINDS) if args.db == "both" else [args.db]
    results = [
        run(
            k,
            clients=args.clients,
            window=args.window,
            rounds=args.rounds,
            web_workers=tuple(args.web_workers),
            orgs=args.orgs,
            LOG_LEVEL=args.log_level,
        )
        for k in kinds
    ]
    print_results(results)
    chart(results)
    print(f"written: {write_results('submission', {'results': results})}")


if __name__ == "__main__":
    main()
