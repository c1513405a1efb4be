"""Prometheus metrics, safe across gunicorn workers and Celery's prefork pool.

With ``PROMETHEUS_MULTIPROC_DIR`` set (the local run sets it to
``var/metrics``; set it in production to a directory each host empties at
start), every process writes its samples there and ``/metrics`` on any web
process of the host aggregates them. Without it, each process counts alone.
Gauges that describe shared state (queue depths, per-organization waiting and
running) are read live from Redis and SQL at scrape time instead.

The metrics are documented in ``docs/operations.rst``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TOP_ORGANIZATIONS = 20
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
)

SUBMISSIONS = Counter(
    "waybill_submissions_total",
    "POST /v1/tasks by outcome: accepted, replayed, rejected_402, rejected_429, rejected_4xx.",
    ["outcome"],
)
LIMIT_REJECTIONS = Counter(
    "waybill_limit_rejections_total",
    "Submissions refused by an organization's limit (credits or queue), by organization.",
    ["organization", "limit"],
)
TASKS_FINISHED = Counter(
    "waybill_tasks_finished_total", "Tasks that reached a final status.", ["type", "status"]
)
TASK_RUN_SECONDS = Histogram(
    "waybill_task_run_seconds", "Handler run time of one attempt.", ["type"], buckets=_LATENCY_BUCKETS
)
TASK_LATENCY_SECONDS = Histogram(
    "waybill_task_latency_seconds",
    "Submission to final status.",
    ["type"],
    buckets=_LATENCY_BUCKETS,
)
WEBHOOK_ATTEMPTS = Counter(
    "waybill_webhook_attempts_total",
    "Webhook attempts by outcome (delivered, http_error, gone, redirect, timeout, ...).",
    ["outcome"],
)
WEBHOOK_DELIVERY_SECONDS = Histogram(
    "waybill_webhook_delivery_seconds",
    "Event creation to successful delivery.",
    buckets=_LATENCY_BUCKETS,
)

WEBHOOK_DEFERRED = Counter(
    "waybill_webhook_deferred_total",
    "Webhook attempts not sent when due, and not counted as attempts, by reason: "
    "organization_limit, host_limit (no slot: the delivery waits its turn), circuit_open.",
    ["reason"],
)


class LiveCollector(Collector):
    """Gauges read at scrape time from Redis (queue depths) and SQL (per-organization counts)."""

    def __init__(self, waybill: Any) -> None:
        self.waybill = waybill

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "waybill_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"]
        )
        try:
            # From the broker (Redis or RabbitMQ), not from the dispatch Redis.
            for queue, count in self.waybill.publisher.queue_depths().items():
                depth.add_metric([queue], float(count))
        except Exception:  # a scrape must not fail because the broker is away
            pass
        yield depth
        yield from self._organizations()
        yield from self._circuits()

    def _circuits(self) -> Iterator[GaugeMetricFamily]:
        """Hosts whose webhook circuit is open or half-open (being probed), from Redis."""
        from app.services.circuits import snapshot

        gauge = GaugeMetricFamily(
            "waybill_webhook_circuits_open",
            "Receiving hosts whose webhook circuit is open (half_open: a probe is in flight).",
            labels=["state"],
        )
        try:
            circuits = snapshot(self.waybill.redis)
        except Exception:  # a scrape must not fail because Redis is away
            return
        for state in ("open", "half_open"):
            gauge.add_metric([state], float(sum(1 for c in circuits if c["state"] == state)))
        yield gauge

    def _organizations(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import func, select

        from app.models import Organization

        waiting = GaugeMetricFamily(
            "waybill_organization_waiting",
            f"Waiting tasks per organization (the top {TOP_ORGANIZATIONS}, the rest as 'other').",
            labels=["organization"],
        )
        running = GaugeMetricFamily(
            "waybill_organization_running",
            f"Running tasks per organization (the top {TOP_ORGANIZATIONS} by waiting, the rest as 'other').",
            labels=["organization"],
        )
        try:
            with self.waybill.db.read_session() as s:
                top = s.execute(
                    select(Organization.id, Organization.queued, Organization.running)
                    .where((Organization.queued > 0) | (Organization.running > 0))
                    .order_by(Organization.queued.desc(), Organization.running.desc())
                    .limit(TOP_ORGANIZATIONS)
                ).all()
                totals = s.execute(
                    select(func.sum(Organization.queued), func.sum(Organization.running))
                ).one()
        except Exception:
            return
        for org_id, q, r in top:
            waiting.add_metric([org_id], float(q))
            running.add_metric([org_id], float(r))
        waiting.add_metric(["other"], float((totals[0] or 0) - sum(q for _, q, _ in top)))
        running.add_metric(["other"], float((totals[1] or 0) - sum(r for _, _, r in top)))
        yield waiting
        yield running


class _OrganizationsSummed:
    """A registry view whose ``organization`` labels are summed into one ``all`` series.

    Organization ids are an operator's business: without ``METRICS_TOKEN``
    anyone who reaches /metrics may read it, so it shows totals only.
    """

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if not any("organization" in sample.labels for sample in family.samples):
                yield family
                continue
            summed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in family.samples:
                labels = dict(sample.labels)
                if "organization" in labels:
                    labels["organization"] = "all"
                key = (sample.name, tuple(sorted(labels.items())))
                if key in summed and sample.name.endswith("_created"):
                    summed[key] = min(summed[key], sample.value)  # a time: the earliest, not a sum
                else:
                    summed[key] = summed.get(key, 0.0) + sample.value
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for (name, pairs), value in summed.items():
                out.add_sample(name, dict(pairs), value)
            yield out


def render(waybill: Any, *, show_organizations: bool) -> tuple[bytes, str]:
    """The whole exposition: this host's counters, then the live gauges.

    Each scrape builds its own registries and never registers anything on the
    process-wide one: concurrent scrapes (threads of one web process) would
    otherwise register the live collector twice and fail.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        counters: Any = CollectorRegistry()
        multiprocess.MultiProcessCollector(counters)
    else:
        from prometheus_client import REGISTRY

        counters = REGISTRY
    live = CollectorRegistry(auto_describe=False)
    live.register(LiveCollector(waybill))
    parts = (
        (counters, live)
        if show_organizations
        else (_OrganizationsSummed(counters), _OrganizationsSummed(live))
    )
    return b"".join(generate_latest(part) for part in parts), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """gunicorn's child_exit hook: drop a dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
