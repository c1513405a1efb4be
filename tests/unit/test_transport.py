"""Contract of app/transport.py with the kombu internals it overrides, on fakeredis.

The subclass replaces kombu's ``Channel.conn_or_acquire`` and builds its
client with ``Channel._create_client`` on ``Channel.pool``. These tests fail
when those change shape, when the subclass stops saving the client kombu
builds per message, and when kombu stops building one per message upstream
(then app/transport.py can go).
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from celery import Celery
from flower.utils.broker import Broker
from flower.utils.broker import Redis as FlowerRedis
from flower.utils.broker import RedisSsl as FlowerRedisSsl
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis

from app import transport
from app.celery_app import celery_config
from config import Settings

N = 50


class ClientCounter:
    """Every ``redis.Redis`` built while it counts (kombu's ``Client`` is ``redis.Redis`` or a subclass)."""

    def __init__(self) -> None:
        self.built: list[redis.Redis] = []
        self.on = False

    @contextmanager
    def counting(self) -> Iterator[None]:
        self.built.clear()
        self.on = True
        try:
            yield
        finally:
            self.on = False


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> ClientCounter:
    counter = ClientCounter()
    original = redis.Redis.__init__

    def counting_init(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if counter.on:
            counter.built.append(self)

    monkeypatch.setattr(redis.Redis, "__init__", counting_init)
    return counter


@pytest.fixture
def broker_url(monkeypatch: pytest.MonkeyPatch) -> str:
    """A Redis URL served by fakeredis: kombu builds its pools' connections from ``connection_class``."""
    monkeypatch.setattr(kombu_redis.Channel, "connection_class", fakeredis.FakeRedisConnection)
    # FakeRedisConnection shares one in-memory server per host:port: a host
    # of this test's own keeps its queues apart from every other test's.
    return f"redis://kombu-contract-{uuid.uuid4().hex}:6379/0"


def queue_length(channel: Any, name: str) -> int:
    with channel.conn_or_acquire() as client:
        return int(client.llen(name))


def test_the_kombu_internals_the_subclass_relies_on_keep_their_shape() -> None:
    stock = kombu_redis.Channel
    conn_or_acquire = stock.__dict__["conn_or_acquire"]
    # A @contextmanager generator function: the subclass's override is used
    # as ``with channel.conn_or_acquire(client) as client`` by kombu's callers.
    assert inspect.isgeneratorfunction(inspect.unwrap(conn_or_acquire))
    parameters = inspect.signature(conn_or_acquire).parameters
    assert list(parameters) == ["self", "client"]
    assert parameters["client"].default is None

    parameters = inspect.signature(stock._create_client).parameters
    assert list(parameters) == ["self", "asynchronous"]
    assert parameters["asynchronous"].default is False

    # ``pool`` is built lazily from ``_pool``; kombu drops a pool by setting
    # ``_pool`` to None, which is how the subclass notices a new pool.
    assert isinstance(stock.__dict__["pool"], property)
    assert stock._pool is None

    assert kombu_redis.Transport.Channel is stock
    assert issubclass(transport.Transport, kombu_redis.Transport)
    assert transport.Transport.Channel is transport.Channel


def publish(url: str, transport_name: str, clients: ClientCounter, name: str) -> int:
    """Publish N messages to queue ``name`` on a new channel; the clients built from the first publish on."""
    queue = Queue(name, Exchange(name, "direct"), name)
    with Connection(url, transport=transport_name) as conn:
        channel = conn.default_channel  # its BRPOP client is built here, before counting
        with clients.counting():
            producer = Producer(channel, exchange=queue.exchange, routing_key=name)
            queue(channel).declare()
            for i in range(N):
                producer.publish({"n": i})
        built = len(clients.built)
        assert queue_length(channel, name) == N
    return built


def test_the_subclass_publishes_through_one_client_where_kombu_builds_one_per_message(
    broker_url: str, clients: ClientCounter
) -> None:
    stock = publish(broker_url, "redis", clients, "contract-stock")
    ours = publish(broker_url, transport.TRANSPORT_ALIAS, clients, "contract-ours")
    # kombu as shipped: at least one client per message (two in kombu 5.7:
    # the exchange lookup and the LPUSH). Fewer means kombu fixed it
    # upstream, and app/transport.py can go.
    assert stock >= N
    assert ours == 1


def test_a_channel_whose_pool_was_replaced_builds_its_client_on_the_new_pool(
    broker_url: str, clients: ClientCounter
) -> None:
    with Connection(broker_url, transport=transport.TRANSPORT_ALIAS) as conn:
        channel = conn.default_channel
        assert isinstance(channel, transport.Channel)
        producer = Producer(channel, routing_key="contract")
        Queue("contract")(channel).declare()
        producer.publish({"n": 0})
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as again:
            assert first is again
        old_pool = channel.pool

        # What kombu runs in a forked child (register_after_fork) and on
        # close: the pools are dropped and the next use builds new ones.
        channel._after_fork()
        assert channel._pool is None
        with clients.counting():
            producer.publish({"n": 1})
        assert len(clients.built) == 1
        rebuilt = clients.built[0]
        assert rebuilt is not first
        assert rebuilt.connection_pool is channel.pool is not old_pool
        with channel.conn_or_acquire() as current:
            assert current is rebuilt

        # A caller's own client (kombu's QoS passes its pipelines) is used as given.
        with channel.conn_or_acquire(client=first) as given:
            assert given is first
        assert queue_length(channel, "contract") == 2


def celery_app(broker_url: str, var_dir: Path) -> Celery:
    settings = Settings.from_env({}, var_dir=str(var_dir), redis_url=broker_url)
    config = celery_config(settings)
    config.pop("include")
    app = Celery("contract", set_as_current=False)
    app.conf.update(config)
    return app


def test_waybills_celery_app_publishes_through_the_subclass_and_shows_a_redis_url(
    broker_url: str, clients: ClientCounter, tmp_path: Path
) -> None:
    app = celery_app(broker_url, tmp_path)
    assert app.conf.broker_url == broker_url  # the operator's URL, unchanged
    with app.connection_for_write() as conn:
        assert conn.get_transport_cls() is transport.Transport
        # The worker's banner, Flower's broker page and `celery inspect` show
        # and use this URL: Flower picks its Redis client by the scheme.
        assert conn.as_uri().startswith("redis://")
        assert type(Broker(conn.as_uri(include_password=True))) is FlowerRedis

    app.send_task("waybill.tasks.run", args=["warm-up"], queue="tasks")
    with clients.counting():
        for i in range(N):
            app.send_task("waybill.tasks.run", args=[str(i)], queue="tasks")
    # Each send_task publishes its message through the client the warm-up
    # built (kombu's own transport builds a client for each publish).
    assert clients.built == []
    with app.connection_for_write() as conn:
        assert queue_length(conn.default_channel, "tasks") == N + 1
    app.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", transport.TRANSPORT_ALIAS),
        ("redis://:secret@redis.internal:6379/7", transport.TRANSPORT_ALIAS),
        ("rediss://redis.internal:6380/0?ssl_cert_reqs=required", transport.TLS_TRANSPORT_ALIAS),
        # No ssl_* parameter: kombu's TLS default comes from the scheme's name.
        ("rediss://redis.internal:6380/0", None),
        ("rediss://redis.internal:6380/0?ssl_cert_reqs=", None),
        ("redis+socket:///var/run/redis.sock", None),
        ("sentinel://redis.internal:26379", None),
        ("amqp://guest:guest@rabbit.internal:5672//", None),
    ],
)
def test_the_transport_is_chosen_only_for_redis_urls(url: str, expected: str | None) -> None:
    assert transport.broker_transport(url) == expected


def test_a_tls_url_keeps_kombus_tls_settings_through_the_subclass() -> None:
    url = "rediss://redis.internal:6380/0?ssl_cert_reqs=required"
    stock = Connection(url)
    ours = Connection(url, transport=transport.broker_transport(url))
    assert ours.get_transport_cls() is transport.Transport
    assert ours.ssl == stock.ssl
    assert ours.ssl
    assert ours.as_uri() == stock.as_uri()
    # As Flower calls it (BaseHandler.get_broker), with Waybill's broker_use_ssl (unset).
    assert type(Broker(ours.as_uri(include_password=True), broker_use_ssl=None)) is FlowerRedisSsl

    # Why a bare rediss:// URL keeps kombu's transport: kombu turns TLS on
    # only for a transport named "rediss". If this starts to hold for our
    # alias too, broker_transport can cover bare rediss:// URLs.
    bare = "rediss://redis.internal:6380/0"
    assert Connection(bare).ssl
    assert not Connection(bare, transport=transport.TLS_TRANSPORT_ALIAS).ssl
