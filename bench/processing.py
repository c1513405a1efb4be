"""Processing throughput: echo tasks from ``queued`` to ``succeeded``, against raw Celery.

Waybill: a backlog of waiting echo tasks is put in SQL and in the
organization's waiting list (as submissions leave them, see
``Platform.fill``), the ``webhooks,maintenance`` worker and beat run as in the
Procfile, then the ``tasks`` worker starts with ``--concurrency C``. Every task
goes the whole way: dispatch step, Celery message, SQL claim, lease, handler,
result recorded once, slot released, next step. The rate is the number of
tasks that reached ``succeeded`` in SQL during a fixed window, after the
first second of progress (imports and connections warm up then), summed
over ``--rounds`` runs taken in turn with the baseline's.

Baseline: the same number of worker processes of a raw Celery app with the
same worker settings (``bench/baseline_app.py``) draining a queue of no-op
messages, counted the same way (messages gone from the queue per second).

Both run at concurrency 1 and 2 (item 3 of the issue: how throughput grows
from one worker process to two on this machine). Target: Waybill >= 0.6 x raw
Celery at the Procfile's concurrency (2).

    python bench/processing.py [--db sqlite|postgresql|both] [--window 5] [--rounds 2] [--concurrency 2 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.baseline_app import NOOP, QUEUE, make_celery
from bench.harness import DB_KINDS, Platform, platform, write_results
from bench.report import bar_chart, table


def measure_window(
    progress: Callable[[], int],
    *,
    available: int,
    warmup: float,
    window: float,
    timeout: float = 120.0,
    interval: float = 0.1,
) -> dict[str, float]:
    """Units of work done per second over ``window`` seconds, once work has started and warmed up.

    ``progress()`` counts work done since the workers started; ``available``
    is all the work there is. If it runs out before the window ends, the rate
    is taken over the shorter span (it is still a rate at full load).
    """
    started = time.monotonic()
    while progress() <= 0:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"no progress within {timeout:.0f} s (see the worker logs)")
        time.sleep(interval / 2)
    first_progress = time.monotonic() - started
    time.sleep(warmup)
    a, ta = progress(), time.monotonic()
    b, tb = a, ta
    while tb - ta < window and b < available:
        time.sleep(interval)
        b, tb = progress(), time.monotonic()
    return {
        "rate_per_s": (b - a) / (tb - ta) if tb > ta else float("nan"),
        "counted": b - a,
        "seconds": round(tb - ta, 3),
        "startup_s": round(first_progress, 2),
        "exhausted": b >= available,
    }


def publish_noops(redis_url: str, count: int) -> float:
    """Queue ``count`` no-op messages for the baseline worker; returns the seconds it took.

    The preload is not what is measured, and publishing one by one through
    kombu takes several round trips per message (seconds per thousand on a
    busy machine). So one message is published by Celery itself, taken back,
    and copied with fresh ids (task id, correlation id, kombu's delivery tag)
    in pipelined LPUSHes: the worker receives exactly what Celery would send.
    """
    started = time.monotonic()
    celery = make_celery(redis_url)
    celery.send_task(NOOP, args=[0], queue=QUEUE)
    client = redis.Redis.from_url(redis_url)
    raw = client.lpop(QUEUE)
    assert isinstance(raw, bytes), "the template message did not reach the queue"
    template = json.loads(raw)
    batch = 1000
    for start in range(0, count, batch):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, count - start)):
            task_id = str(uuid.uuid4())
            template["headers"]["id"] = task_id
            template["headers"]["root_id"] = task_id
            template["properties"]["correlation_id"] = task_id
            template["properties"]["delivery_tag"] = str(uuid.uuid4())
            pipe.lpush(QUEUE, json.dumps(template))
        pipe.execute()
    client.close()
    return time.monotonic() - started


def waybill_rate(p: Platform, org_id: str, concurrency: int, fill: int, window: float) -> dict[str, Any]:
    p.fill(org_id, fill)
    before = p.count_status("succeeded")
    available = p.count_status("queued")
    proc = p.worker("worker", queues="tasks", concurrency=concurrency)
    try:
        out = measure_window(
            lambda: p.count_status("succeeded") - before, available=available, warmup=1.0, window=window
        )
    finally:
        p.stop_one(proc)
    return out


def raw_rate(p: Platform, concurrency: int, messages: int, window: float) -> dict[str, Any]:
    client = redis.Redis.from_url(p.redis.url)
    client.delete(QUEUE)
    publish_s = publish_noops(p.redis.url, messages)
    proc = p.worker("baseline-worker", queues=QUEUE, concurrency=concurrency, app="bench.baseline_app")
    try:
        out = measure_window(
            lambda: messages - int(client.llen(QUEUE)), available=messages, warmup=1.0, window=window
        )
    finally:
        p.stop_one(proc)
        client.delete(QUEUE)
        client.close()
    out["publish_s"] = round(publish_s, 2)
    return out


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one side at one concurrency: work counted over time counted, and each round's rate."""
    counted = sum(x["counted"] for x in parts)
    seconds = sum(x["seconds"] for x in parts)
    return {
        "rate_per_s": counted / seconds if seconds else float("nan"),
        "counted": counted,
        "seconds": round(seconds, 3),
        "rounds": [round(x["rate_per_s"], 1) for x in parts],
        "startup_s": [x["startup_s"] for x in parts],
        "exhausted": any(x["exhausted"] for x in parts),
    }


def run(
    db_kind: str,
    *,
    concurrencies: tuple[int, ...] = (2, 1),
    window: float = 5.0,
    rounds: int = 2,
    fill: int = 3000,
    messages: int = 4000,
    **env: str,
) -> dict[str, Any]:
    """Both sides at each concurrency, ``rounds`` times in turn, in one platform (one database, one Redis).

    Taking turns (Waybill 2, raw 2, Waybill 1, raw 1, then again) spreads a
    noisy neighbour's bursts over every figure instead of one.
    """
    parts: dict[str, dict[str, list[dict[str, Any]]]] = {
        "waybill": {str(c): [] for c in concurrencies},
        "raw_celery": {str(c): [] for c in concurrencies},
    }
    with platform(db_kind, **env) as p:
        org_id = p.org("bench-processing", concurrency_limit=100).id
        # As the Procfile: deliveries and the maintenance queue (dispatch
        # steps every second, the sweep) on their own worker, and beat.
        p.worker("webhooks", queues="webhooks,maintenance", concurrency=4)
        p.beat()
        for _ in range(rounds):
            for c in concurrencies:
                parts["waybill"][str(c)].append(waybill_rate(p, org_id, c, fill, window))
                parts["raw_celery"][str(c)].append(raw_rate(p, c, messages, window))
    results: dict[str, Any] = {
        "db": db_kind,
        "window_s": window,
        "rounds": rounds,
        **{side: {c: combine(x) for c, x in by_c.items()} for side, by_c in parts.items()},
    }
    for side in ("waybill", "raw_celery"):
        by_c = results[side]
        if "1" in by_c and "2" in by_c:
            by_c["scaling_1_to_2"] = by_c["2"]["rate_per_s"] / by_c["1"]["rate_per_s"]
    top = str(max(concurrencies))
    results["ratio"] = results["waybill"][top]["rate_per_s"] / results["raw_celery"][top]["rate_per_s"]
    results["ratio_concurrency"] = int(top)
    return results


def print_results(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        for c in sorted((k for k in r["waybill"] if k.isdigit()), reverse=True):
            w, b = r["waybill"][c]["rate_per_s"], r["raw_celery"][c]["rate_per_s"]
            rows.append([r["db"], int(c), w, b, w / b])
        rows.append(
            [
                r["db"],
                "1->2",
                r["waybill"].get("scaling_1_to_2", float("nan")),
                r["raw_celery"].get("scaling_1_to_2", float("nan")),
                "",
            ]
        )
    table(
        "Processing throughput, tasks/s (echo: queued -> succeeded; raw Celery: no-op)   target >= 0.6",
        ["db", "processes", "waybill", "raw celery", "ratio"],
        rows,
        digits=2,
    )


def chart(results: list[dict[str, Any]]) -> None:
    groups, waybill, raw = [], [], []
    for r in results:
        for c in sorted((k for k in r["waybill"] if k.isdigit()), reverse=True):
            groups.append(f"{r['db']}\nconcurrency {c}")
            waybill.append(r["waybill"][c]["rate_per_s"])
            raw.append(r["raw_celery"][c]["rate_per_s"])
    bar_chart(
        "processing",
        "Processing throughput (tasks/s)",
        groups,
        {"waybill echo": waybill, "raw celery no-op": raw},
        "tasks/s",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=[*DB_KINDS, "both"], default="both")
    parser.add_argument("--window", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side and concurrency, in turn")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--fill", type=int, default=3000, help="waiting echo tasks added per run")
    parser.add_argument("--messages", type=int, default=4000, help="no-op messages per baseline run")
    parser.add_argument("--log-level", default="INFO", help="Waybill's LOG_LEVEL (production default INFO)")
    args = parser.parse_args()
    kinds = list(DB_KINDS) if args.db == "both" else [args.db]
    results = [
        run(
            kind,
            concurrencies=tuple(args.concurrency),
            window=args.window,
            rounds=args.rounds,
            fill=args.fill,
            messages=args.messages,
            LOG_LEVEL=args.log_level,
        )
        for kind in kinds
    ]
    print_results(results)
    chart(results)
    print(f"written: {write_results('processing', {'results': results})}")


if __name__ == "__main__":
    main()
