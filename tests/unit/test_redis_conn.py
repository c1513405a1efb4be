"""REDIS_URL's forms (app/redis_conn.py): one server, Sentinel, Cluster; and the Celery broker they give."""

from __future__ import annotations

import re

import pytest
import redis
from kombu import Connection
from kombu.utils.url import url_to_parts
from redis.sentinel import SentinelConnectionPool

from app.celery_app import celery_config
from app.redis_conn import connect, is_cluster, kombu_broker, parse_multi_host, scheme_of
from config import Settings


def test_a_sentinel_url_names_its_sentinels_master_and_database() -> None:
    parsed = parse_multi_host("redis+sentinel://10.0.0.1:26380,s2,[::1]:26381,[fe80::2]/mymaster/3")
    assert parsed.scheme == "redis+sentinel"
    assert parsed.hosts == (("10.0.0.1", 26380), ("s2", 26379), ("::1", 26381), ("fe80::2", 26379))
    assert (parsed.master, parsed.db) == ("mymaster", 3)
    assert parsed.username is None and parsed.password is None and parsed.query == {}


def test_a_sentinel_url_without_database_uses_0_and_any_scheme_case() -> None:
    parsed = parse_multi_host("REDIS+Sentinel://h:1/my%20master")
    assert (parsed.scheme, parsed.hosts, parsed.master, parsed.db) == (
        "redis+sentinel",
        (("h", 1),),
        "my master",
        0,
    )


@pytest.mark.parametrize(
    ("userinfo", "username", "password"),
    [
        (":s3cret@", None, "s3cret"),
        ("alice:s3cret@", "alice", "s3cret"),
        ("alice@", "alice", None),
        (":p%40ss%3Aw%2Frd+%25@", None, "p@ss:w/rd+%"),  # percent-encoded; a + stays a +
    ],
)
def test_the_masters_credentials(userinfo: str, username: str | None, password: str | None) -> None:
    parsed = parse_multi_host(f"redis+sentinel://{userinfo}h:26379,h2:26379/m/0")
    assert (parsed.username, parsed.password) == (username, password)
    assert parsed.hosts == (("h", 26379), ("h2", 26379))


def test_the_sentinels_own_password_is_an_option_and_keeps_its_plus() -> None:
    parsed = parse_multi_host("redis+sentinel://:master@h:1/m/2?sentinel_password=a+b%26c")
    assert parsed.password == "master"
    assert parsed.query == {"sentinel_password": "a+b&c"}
    assert parsed.db == 2


def test_a_cluster_url_lists_its_startup_nodes() -> None:
    parsed = parse_multi_host("redis+cluster://:pw@127.0.0.1:7000, 127.0.0.1:7001 ,[::1]:7002,node4")
    assert parsed.hosts == (("127.0.0.1", 7000), ("127.0.0.1", 7001), ("::1", 7002), ("node4", 6379))
    assert parsed.password == "pw" and parsed.master == "" and parsed.db == 0
    assert parse_multi_host("redis+cluster://h:7000/0").db == 0
    assert parse_multi_host("redis+cluster://h:7000/").hosts == (("h", 7000),)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:26379", "names the master after the hosts"),
        ("redis+sentinel://h:26379/", "names the master after the hosts"),
        ("redis+sentinel://h:26379/m/x", "'x' is not a database number"),
        ("redis+sentinel://h:26379/m/0/extra", "too many path parts"),
        ("redis+sentinel:///mymaster", "no host in the Redis URL"),
        ("redis+sentinel://h:port/m", "'h:port' in the Redis URL is not a port number"),
        ("redis+sentinel://h:70000/m", "is not a port number (1-65535)"),
        ("redis+sentinel://h:0/m", "is not a port number"),
        ("redis+sentinel://:26379/m", "':26379' in the Redis URL names no host"),
        ("redis+sentinel://::1:26379/m", "write an IPv6 address in brackets"),
        ("redis+sentinel://[::1:26379/m", "write an IPv6 address as [::1]:26379"),
        ("redis+sentinel://[::1]26379/m", "write an IPv6 address as [::1]:26379"),
        ("redis+sentinel://[]:26379/m", "names no host"),
        ("redis+sentinel://h/m?password=x", "unknown option 'password'"),
        ("redis+cluster://h:7000/1", "Redis Cluster has only database 0"),
        ("redis+cluster://h:7000/x", "'x' is not a database number"),
        ("redis+cluster://h:7000?sentinel_password=x", "unknown option 'sentinel_password'"),
        ("redis+cluster://", "no host in the Redis URL"),
        ("redis://h:6379/0", "not a redis+sentinel:// or redis+cluster:// URL"),
        ("h:6379", "not a redis+sentinel:// or redis+cluster:// URL"),
    ],
)
def test_a_malformed_url_is_refused_saying_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_multi_host(url)


def test_scheme_of_never_raises() -> None:
    assert scheme_of("Redis+Cluster://[::1") == "redis+cluster"
    assert scheme_of("amqp://guest:guest@h:5672/") == "amqp"
    assert scheme_of("not a url") == ""
    assert is_cluster("redis+cluster://h:1") and not is_cluster("redis://h:1")


def test_connect_builds_the_client_of_each_form_without_connecting() -> None:
    plain = connect("redis://127.0.0.1:1/4", socket_timeout=1)
    assert isinstance(plain, redis.Redis) and plain.connection_pool.connection_kwargs["db"] == 4

    client = connect(
        "redis+sentinel://u:pw@127.0.0.1:1,[::1]:2/mymaster/5?sentinel_password=sp",
        socket_connect_timeout=1,
        socket_timeout=2,
        health_check_interval=30,
    )
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 5
    assert (pool.connection_kwargs["username"], pool.connection_kwargs["password"]) == ("u", "pw")
    sentinels = pool.sentinel_manager.sentinels
    assert [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinels
    ] == [
        ("127.0.0.1", 1),
        ("::1", 2),
    ]
    sentinel_kwargs = sentinels[0].connection_pool.connection_kwargs
    assert sentinel_kwargs["password"] == "sp" and sentinel_kwargs["socket_timeout"] == 2


def test_a_cluster_no_node_of_which_answers_is_a_redis_connection_error() -> None:
    """Callers treat a Redis that is away as a RedisError (the sweep repairs); redis-py raises another."""
    with pytest.raises(redis.ConnectionError, match="Redis Cluster cannot be connected"):
        connect("redis+cluster://127.0.0.1:1", socket_connect_timeout=0.5, health_check_interval=30)


# -- the Celery broker -----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw@h:6379/2",
        "rediss://h:6380/0?ssl_cert_reqs=required",
        "amqp://guest:guest@h:5672/vh",
        "unix:///r.sock",
    ],
)
def test_other_urls_are_kombus_already(url: str) -> None:
    assert kombu_broker(url) == (url, {})


def test_a_sentinel_url_becomes_kombus_sentinel_urls_and_master_name() -> None:
    broker, options = kombu_broker("redis+sentinel://s1:26380,[::1]:26381,s3/mymaster/4")
    assert broker == "sentinel://s1:26380/4;sentinel://[::1]:26381/4;sentinel://s3:26379/4"
    assert options == {"master_name": "mymaster"}


def test_the_sentinel_brokers_credentials_survive_kombus_parsing() -> None:
    """kombu percent-decodes the URL's password: one holding @ : / + % must arrive as it was."""
    broker, options = kombu_broker(
        "redis+sentinel://bob:p%40ss%3Aw%2Frd+%25@s1:1,[::1]:2/mymaster/0?sentinel_password=sp"
    )
    assert options == {"master_name": "mymaster", "sentinel_kwargs": {"password": "sp"}}
    conn = Connection(broker, transport_options=options)
    assert conn.transport_cls == "sentinel"
    alternates = [url_to_parts(u) for u in conn.alt]
    assert [(p.hostname, p.port) for p in alternates] == [("s1", 1), ("::1", 2)]
    assert {(p.username, p.password, p.path) for p in alternates} == {("bob", "p@ss:w/rd+%", "0")}
    assert (conn.userid, conn.password, conn.virtual_host) == ("bob", "p@ss:w/rd+%", "0")


def test_a_cluster_cannot_be_the_celery_broker() -> None:
    with pytest.raises(RuntimeError, match="set BROKER_URL to RabbitMQ"):
        kombu_broker("redis+cluster://h:7000,h:7001")


def test_celery_config_of_each_form() -> None:
    sentinel = Settings.from_env({}, redis_url="redis+sentinel://127.0.0.1:26390,127.0.0.1:26391/mymaster/1")
    config = celery_config(sentinel)
    assert config["broker_url"] == "sentinel://127.0.0.1:26390/1;sentinel://127.0.0.1:26391/1"
    assert config["broker_transport"] is None  # kombu's Sentinel transport, not Waybill's Redis alias
    assert config["broker_transport_options"]["master_name"] == "mymaster"
    assert config["broker_transport_options"]["visibility_timeout"] == 3 * 3600  # kept beside it

    cluster = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    with pytest.raises(RuntimeError, match="cannot be a Redis Cluster"):
        celery_config(Settings.from_env({}, redis_url=cluster))
    amqp = celery_config(
        Settings.from_env({}, redis_url=cluster, broker_url="amqp://guest:guest@127.0.0.1:5672/v")
    )
    assert amqp["broker_url"] == "amqp://guest:guest@127.0.0.1:5672/v"
