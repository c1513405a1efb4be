"""Fixtures of the integration tests: real Redis, Celery workers, beat, gunicorn, webhook receivers.

The processes and the receiver are ``tests.support``'s (the benchmarks use
the same). Every process logs to a file under the test's temporary directory
(printed when a test fails) and is stopped at the end of the test, killed if
it does not stop in time.

Each test module sets ``pytestmark = pytest.mark.integration`` itself: pytest
ignores ``pytestmark`` in a conftest.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from app import redis_conn
from app.db import Database
from app.embedded_redis import EmbeddedRedis
from tests.support import Receiver, Stack, empty_tables
from tests.support import redis_topologies as topologies
from tests.support.rabbitmq import AMQP_URL_ENV, vhost
from tests.support.redis_topologies import ClusterSetup

# The outcome of a test's call phase, for its fixtures' teardown to read.
CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.fixture
def make_stack(
    request: pytest.FixtureRequest, tmp_path: Path, migrated: str, shared_redis_url: str
) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []
    db = Database(migrated)
    vhosts = contextlib.ExitStack()

    def build(redis_url: str | None = None, **env: str) -> Stack:
        url = redis_url or shared_redis_url
        redis_conn.connect(url).flushdb()  # every form: a Cluster's FLUSHDB goes to each master
        empty_tables(db)
        # TEST_AMQP_URL (CI's RabbitMQ pass): the broker is RabbitMQ, in a
        # virtual host of this stack's own, the dispatch state stays on Redis.
        amqp = os.environ.get(AMQP_URL_ENV)
        broker = {"BROKER_URL": vhosts.enter_context(vhost(amqp))} if amqp else {}
        full_env = {
            **os.environ,
            **broker,
            "DATABASE_URL": migrated,
            "REDIS_URL": url,
            "VAR_DIR": str(tmp_path / "var"),
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "FETCH_ALLOW_PRIVATE": "true",
            "SWEEP_INTERVAL_SECONDS": "1",
            "SWEEP_GRACE_SECONDS": "2",
            "TASK_LEASE_SECONDS": "3",
            "WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            "WEBHOOK_TIMEOUT_SECONDS": "2",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        stack = Stack(env=full_env, log_dir=tmp_path, db=db)
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        stack.stop()
    vhosts.close()
    report = request.node.stash.get(CALL_REPORT, None)
    if report is not None and report.failed:
        for stack in stacks:
            for proc in stack.procs:
                sys.stderr.write(f"\n----- {proc.name} log -----\n{proc.output()[-6000:]}\n")
    empty_tables(db)
    db.dispose()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    return report


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, which it may stop and restart (never the shared one)."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    """A three-master Redis Cluster of this module's own (``tests/support/redis_topologies.py``)."""
    if not topologies.available():
        pytest.skip("redis-server and redis-cli (Redis 7) are needed for a Redis Cluster")
    with topologies.redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as setup:
        yield setup
