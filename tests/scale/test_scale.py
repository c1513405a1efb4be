"""Three nodes, two beats, one node killed and started again (see tests/scale/harness.py).

``make test`` runs a short version on whatever broker the suite uses
(RabbitMQ when TEST_AMQP_URL is set, else Redis); ``make scale`` a long one on
PostgreSQL and RabbitMQ. Scale with SCALE_TASKS, SCALE_NODE_KILLS,
SCALE_SECONDS; SCALE_REPORT names a file for the JSON report.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import redis

from app.db import Database
from tests.scale.harness import ScaleConfig, run_scale
from tests.support import empty_tables
from tests.support.rabbitmq import AMQP_URL_ENV, vhost

pytestmark = pytest.mark.integration


def test_three_nodes_lose_nothing_and_stay_fair_when_one_dies(
    tmp_path: Path, migrated: str, shared_redis_url: str
) -> None:
    env = os.environ
    cfg = ScaleConfig(
        tasks=int(env.get("SCALE_TASKS", "240")),
        node_kills=int(env.get("SCALE_NODE_KILLS", "1")),
        max_seconds=float(env.get("SCALE_SECONDS", "180")),
    )
    db = Database(migrated)
    empty_tables(db)
    redis.Redis.from_url(shared_redis_url).flushdb()
    with contextlib.ExitStack() as stack:
        amqp = env.get(AMQP_URL_ENV)
        broker = {"BROKER_URL": stack.enter_context(vhost(amqp, "waybill-scale"))} if amqp else {}
        process_env = {**os.environ, **broker, "DATABASE_URL": migrated, "REDIS_URL": shared_redis_url}
        report = run_scale(tmp_path, cfg, process_env, db)
    out = Path(env.get("SCALE_REPORT", tmp_path / "scale-report.json"))
    out.write_text(json.dumps(asdict(report), indent=2))
    print("\n" + report.line())
    empty_tables(db)
    db.dispose()
    assert report.ok(), (report.line(), report.problems[:20])
    assert report.node_kills == cfg.node_kills and report.tasks_accepted > cfg.tasks
    # Clients sent requests to the dead node and took them elsewhere, under the same key.
    assert report.retried_elsewhere > 0
    # Every node ran tasks, and both beats swept (two at once did no harm: the books above).
    assert all(n > 0 for n in report.finished_per_node.values()), report.finished_per_node
    assert report.beats_that_swept == cfg.beats
    # Fair across nodes: each late task was submitted behind a backlog of the
    # big organization and started before nearly all of it (round-robin gives
    # it one turn of the ring plus the tasks already released to workers).
    assert report.late_tasks == 12
    assert report.late_backlog_min >= 20, report.line()
    assert report.late_overtaken_by_max <= max(30, report.late_backlog_min // 3), report.line()
