"""Dispatch state on a real Redis Cluster of three masters (``REDIS_URL=redis+cluster://...``).

Every key of Waybill carries the hash tag ``{waybill}`` (app/dispatch/keys.py),
so every script, and every pipeline, runs on the one node holding that slot.
The scenarios of tests/unit/test_dispatch.py (fakeredis) run here unchanged
on the cluster client ``redis_conn.connect`` builds; then what only a cluster
shows (one slot, three masters, the node CONFIG GET must ask, PUBLISH and
EVALSHA in redis-py's cluster pipeline), and a whole Waybill with its dispatch
state on the cluster and Celery on RabbitMQ.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import requests
from sqlalchemy import select

from app import redis_conn
from app.dispatch import Dispatcher, DispatchSettings, keys
from app.models import Task
from app.services.waiting import Waiter
from tests.support import Api, Receiver, Stack, wait_for
from tests.support.rabbitmq import AMQP_URL_ENV, vhost
from tests.support.receiver import event_task_id
from tests.support.redis_topologies import ClusterSetup
from tests.unit import test_dispatch as on_fakeredis

pytestmark = pytest.mark.integration

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
def r(cluster: ClusterSetup) -> Iterator[Any]:
    """The cluster client Waybill builds, on empty masters that know no script."""
    cluster.flushall()
    for node in cluster.nodes:
        node.client().script_flush()
    client = redis_conn.connect(cluster.url, socket_connect_timeout=2, socket_timeout=5)
    yield client
    client.close()


# -- test_dispatch.py's scenarios, on the cluster ------------------------------------

SCENARIOS: list[Callable[..., None]] = [
    on_fakeredis.test_organizations_are_served_in_turn,
    on_fakeredis.test_a_newcomer_waits_one_turn_not_the_backlog,
    on_fakeredis.test_the_room_is_released_tasks_no_worker_has_started,
    on_fakeredis.test_concurrency_limit_counts_unexpired_leases,
    on_fakeredis.test_an_expired_lease_puts_the_task_back_in_front,
    on_fakeredis.test_enqueue_is_idempotent_and_release_removes_a_waiting_task,
    on_fakeredis.test_rebuild_restores_waiting_tasks_from_sql,
    on_fakeredis.test_enqueue_steps_and_publishes_and_the_sweep_confirms_it,
    on_fakeredis.test_an_orphaned_run_comes_back_even_when_redis_holds_a_stale_lease,
    on_fakeredis.test_the_drain_rate_counts_releases_and_decays,
    on_fakeredis.test_finish_and_step_frees_the_slot_notifies_and_refills_in_one_go,
    on_fakeredis.test_enqueue_and_step_is_enqueue_then_step,
    on_fakeredis.test_a_script_redis_does_not_know_yet_loses_no_released_task,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_dispatch_scenario_on_the_cluster(
    scenario: Callable[..., None], r: Any, request: pytest.FixtureRequest
) -> None:
    """The same assertions as on fakeredis; ``r`` is the cluster client, other fixtures (db, org) as there."""
    names = inspect.signature(scenario).parameters
    scenario(**{name: r if name == "r" else request.getfixturevalue(name) for name in names})


# -- what only a cluster shows -------------------------------------------------------


def _dispatch_key_names() -> list[str]:
    fixed = [
        getattr(keys, name) for name in dir(keys) if name.isupper() and isinstance(getattr(keys, name), str)
    ]
    return [*fixed, keys.waiting_key("org_a"), keys.leases_key("org_a"), keys.DONE_CHANNEL + "task_x"]


def test_three_masters_and_every_dispatch_key_in_one_slot_on_one_node(cluster: ClusterSetup, r: Any) -> None:
    info = cluster.nodes[0].client().cluster("info")
    assert info["cluster_state"] == "ok"
    assert (int(info["cluster_size"]), int(info["cluster_known_nodes"])) == (3, 3)
    assert cluster.masters() == sorted(n.hostport for n in cluster.nodes)

    slots = {r.keyslot(name) for name in _dispatch_key_names()}
    assert len(slots) == 1, slots
    (slot,) = slots

    # A workload touching every kind of key: waiting lists of two
    # organizations, leases, the ring, limits, drain, epoch, the cursor.
    d = Dispatcher(r, DispatchSettings(queue_target=3))
    for i in range(5):
        d.enqueue("org_a", f"a{i}", 2)
        d.enqueue("org_b", f"b{i}", 2)
    assert d.enqueue_and_step("org_b", "b5", 2) == ["a0", "b0", "a1"]
    assert d.finish_and_step("a0", notify=(keys.DONE_CHANNEL + "a0", "succeeded")) == ["b1"]
    assert d.renew("b0", 30) and d.renew("a1", 30)
    d.set_concurrency_limit("org_a", 2)
    d.mark_epoch()
    d.set_verify_cursor("a3")
    r.incr(keys.AUTH_FAILURES + "127.0.0.1:1")

    owner = next(n for n in cluster.nodes if n.port == r.get_node_from_key(keys.EPOCH).port)
    sizes = {n.hostport: int(n.client().dbsize()) for n in cluster.nodes}
    in_slot = int(owner.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
    assert sizes[owner.hostport] == in_slot == sum(sizes.values()) >= 10, sizes
    assert sorted(sizes.values())[:2] == [0, 0]  # the two other masters hold nothing of Waybill's


def test_missing_renew_give_back_release_and_the_epoch(r: Any) -> None:
    d = Dispatcher(r, DispatchSettings(queue_target=10))
    assert not d.has_epoch()
    d.mark_epoch()
    assert d.has_epoch()
    for i in range(3):
        d.enqueue("A", f"a{i}", 2)
    assert d.step() == ["a0", "a1"]
    assert d.missing(["a0", "a1", "a2", "gone"]) == ["gone"]  # leased, leased, waiting
    assert d.renew("a0", 60) and not d.renew("gone", 60)
    d.give_back("a1")
    assert d.step() == ["a1"]  # back in front, released again
    d.release("a0")
    d.release("a2", "A")  # canceled while waiting
    assert d.missing(["a0", "a1", "a2"]) == ["a0", "a2"]
    assert d.running("A") == 1 and d.step() == []
    d.set_verify_cursor("task_1")
    assert d.verify_cursor() == "task_1"


def test_the_eviction_warning_asks_the_node_that_holds_dispatch(cluster: ClusterSetup, r: Any) -> None:
    d = Dispatcher(r)
    owner = r.get_node_from_key(keys.EPOCH)
    holder = next(n for n in cluster.nodes if n.port == owner.port)
    other = next(n for n in cluster.nodes if n.port != owner.port)
    assert d.eviction_warning() is None
    try:
        other.client().config_set("maxmemory-policy", "allkeys-lru")
        assert d.eviction_warning() is None  # no dispatch key can be evicted there
        holder.client().config_set("maxmemory-policy", "volatile-lru")
        warning = d.eviction_warning()
        assert warning is not None and "volatile-lru" in warning
    finally:
        for node in cluster.nodes:
            node.client().config_set("maxmemory-policy", "noeviction")


def test_readiness_pings_the_node_that_holds_dispatch(cluster: ClusterSetup, r: Any) -> None:
    """/readyz's check: a master that holds nothing of Waybill's may be slow, the dispatch one may not."""
    holder = next(n for n in cluster.nodes if n.port == r.get_node_from_key(keys.EPOCH).port)
    others = [n for n in cluster.nodes if n is not holder]
    impatient = redis_conn.connect(cluster.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    d = Dispatcher(impatient)
    # Frozen (SIGSTOP) for less than cluster-node-timeout: no node is failed over.
    try:
        for node in others:
            node.proc.kill_group(signal.SIGSTOP)
        assert d.ping()
        for node in others:
            node.proc.kill_group(signal.SIGCONT)
        holder.proc.kill_group(signal.SIGSTOP)
        with pytest.raises(redis.RedisError):
            d.ping()
    finally:
        for node in cluster.nodes:
            node.proc.kill_group(signal.SIGCONT)
        impatient.close()
    wait_for(cluster.ok, 10, "cluster_state:ok")


def test_a_waiting_request_is_woken_through_the_cluster_by_finish_and_step(
    cluster: ClusterSetup, r: Any
) -> None:
    """``Prefer: wait``'s subscriber and the worker's pipelined PUBLISH, across a cluster."""
    d = Dispatcher(r)
    d.enqueue("A", "a0", 1)
    assert d.step() == ["a0"]
    final = threading.Event()
    outcome: list[tuple[bool | None, float]] = []

    def wait() -> None:
        started = time.monotonic()
        woken = Waiter(1).wait(r, "a0", 20, final.is_set)
        outcome.append((woken, time.monotonic() - started))

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    channel = keys.DONE_CHANNEL + "a0"

    def subscribed() -> bool:  # PUBSUB NUMSUB counts a node's own subscribers only
        return sum(int(n.client().pubsub_numsub(channel)[0][1]) for n in cluster.nodes) == 1

    wait_for(subscribed, 10, "the subscription")
    final.set()
    r.script_flush()  # and the pipeline's scripts must be loaded again on the way
    assert d.finish_and_step("a0", notify=(channel, "succeeded")) == []
    waiter.join(15)
    ((woken, seconds),) = outcome
    # Woken by the message, not by its re-check of the database every 5 s.
    assert woken is True and seconds < 4, seconds


# -- a whole Waybill: dispatch on the cluster, Celery on RabbitMQ -------------------


def _amqp_reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def amqp_vhost() -> Iterator[str]:
    """A RabbitMQ virtual host of this test's own (a Cluster cannot carry Celery's messages)."""
    base = os.environ.get(AMQP_URL_ENV) or DEFAULT_AMQP_URL
    if shutil.which("rabbitmqctl") is None or not _amqp_reachable(base):
        pytest.skip(f"RabbitMQ is needed as the broker beside a Redis Cluster ({base}, rabbitmqctl)")
    with vhost(base) as url:
        yield url


def test_core_flow_with_dispatch_on_the_cluster(
    cluster: ClusterSetup,
    amqp_vhost: str,
    make_stack: Callable[..., Stack],
    receiver: Receiver,
) -> None:
    stack = make_stack(redis_url=cluster.url, BROKER_URL=amqp_vhost)
    stack.web()
    stack.worker(concurrency=4)
    stack.webhooks_worker()
    stack.beat()
    apis = [Api(stack.base_url, stack.org(name, concurrency_limit=3)) for name in ("north", "south")]

    # Prefer: wait: the web process subscribes on the cluster, the worker's
    # pipeline publishes there; a wake-up by the database's re-check would
    # take 5 s.
    started = time.monotonic()
    waited = apis[0].submit({"type": "echo", "input": {"n": -1}}, Prefer="wait=20")
    assert waited.status_code == 200, waited.text
    assert waited.json()["status"] == "succeeded" and time.monotonic() - started < 4

    accepted: dict[str, str] = {}  # task id -> organization
    for i in range(30):
        api = apis[i % 2]
        body = {"type": "echo", "input": {"n": i}, "webhook": {"url": f"{receiver.url}/{api.org.id}"}}
        r = api.submit(body)
        assert r.status_code == 202, r.text
        accepted[r.json()["taskId"]] = api.org.id

    def statuses() -> dict[str, str]:
        with stack.db.session() as s:
            rows = s.execute(select(Task.id, Task.status).where(Task.id.in_(list(accepted))))
            return {task_id: status for task_id, status in rows}

    wait_for(
        lambda: set(statuses().values()) == {"succeeded"} and len(statuses()) == len(accepted),
        60,
        "every task to succeed",
        interval=0.2,
    )
    wait_for(lambda: set(accepted) <= set(receiver.first_arrival), 30, "every webhook", interval=0.1)
    for got in list(receiver.received):  # each organization's events at its own URL
        assert got.path == "/" + accepted[event_task_id(got.body)]

    for api in apis:
        org = api.http.get(stack.base_url + "/v1/organization", timeout=10).json()
        assert org["queued"] == 0 and org["running"] == 0

    ready = requests.get(stack.base_url + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["broker"] == "ok" and ready.json()["checks"]["redisEviction"] == "ok"

    # The limiter of failed keys counts on the cluster (a pipeline of INCR and EXPIRE).
    bad = requests.get(stack.base_url + "/v1/tasks", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401
    counted = [k for n in cluster.nodes for k in n.client().keys(keys.AUTH_FAILURES + "*")]
    assert len(counted) == 1, counted
    # Beat's sweep runs on the cluster too: it finds no epoch (the state was
    # flushed) and rebuilds it from SQL, through the cluster pipeline.
    client = redis_conn.connect(cluster.url)
    wait_for(lambda: client.exists(keys.EPOCH), 30, "the sweep to mark the dispatch state whole", 0.2)
    client.close()

    # No process met a Redis error on the way (a cluster pipeline refusing a command, a script).
    failures = [
        (proc.name, rec.get("event"), rec.get("error"))
        for proc in stack.procs
        for rec in proc.log_records()
        if rec.get("event") in ("dispatch.failed", "task.enqueue_failed", "lease.renew_failed")
        or (rec.get("logger") == "celery.app.trace" and rec.get("level") == "error")
    ]
    assert failures == []
    assert any(r.get("event") == "dispatch.rebuilt" for p in stack.procs for r in p.log_records())
