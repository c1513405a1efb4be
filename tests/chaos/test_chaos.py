"""The chaos run (see tests/chaos/harness.py). ``make test`` runs a short one; ``make chaos`` a long one.

Scale with CHAOS_TASKS, CHAOS_WORKER_KILLS, CHAOS_CHILD_KILLS, CHAOS_REDIS_RESTARTS,
CHAOS_REDIS_ROLLBACKS, CHAOS_POSTGRES_RESTARTS, CHAOS_BROKER_DISCONNECTS (RabbitMQ only:
TEST_AMQP_URL makes RabbitMQ the broker), CHAOS_POISON_SHARE (hostile submissions,
as a share of CHAOS_TASKS), CHAOS_SECONDS.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.chaos.harness import POISON_KINDS, ChaosConfig, run_chaos

pytestmark = pytest.mark.integration


def _config() -> ChaosConfig:
    env = os.environ
    return ChaosConfig(
        tasks=int(env.get("CHAOS_TASKS", "150")),
        worker_kills=int(env.get("CHAOS_WORKER_KILLS", "2")),
        child_kills=int(env.get("CHAOS_CHILD_KILLS", "2")),
        redis_restarts=int(env.get("CHAOS_REDIS_RESTARTS", "1")),
        redis_rollbacks=int(env.get("CHAOS_REDIS_ROLLBACKS", "1")),
        # The short run restarts PostgreSQL only in the PostgreSQL pass of the suite.
        postgres_restarts=int(
            env.get("CHAOS_POSTGRES_RESTARTS", "1" if os.environ.get("DATABASE_URL") else "0")
        ),
        broker_disconnects=int(env.get("CHAOS_BROKER_DISCONNECTS", "1")),
        poison_share=float(env.get("CHAOS_POISON_SHARE", "0.05")),
        max_seconds=float(env.get("CHAOS_SECONDS", "150")),
    )


def test_nothing_is_lost_duplicated_or_double_charged_under_faults(tmp_path: Path) -> None:
    cfg = _config()
    report = run_chaos(tmp_path, cfg)
    out = Path(os.environ.get("CHAOS_REPORT", tmp_path / "chaos-report.json"))
    out.write_text(json.dumps(asdict(report), indent=2))
    print("\n" + report.line())
    print(json.dumps({k: v for k, v in asdict(report).items() if k != "problems"}))
    assert report.ok(), (report.line(), report.problems[:20])
    assert report.tasks_accepted > 0 and report.redis_restarts >= 1
    # The faults and the hostile inputs all happened, or the run proved less than it says.
    assert report.redis_rollbacks == cfg.redis_rollbacks
    assert cfg.poison_share <= 0 or report.poison_kinds.keys() == POISON_KINDS.keys()
    # ...and a rollback left out of Redis queued tasks whose dispatch the sweep had
    # confirmed: the case only the sweep's walk of every queued task (verify_queued) repairs.
    assert cfg.redis_rollbacks == 0 or report.rollback_confirmed_missing > 0
