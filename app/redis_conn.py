"""Redis clients from one URL, whatever keeps Redis alive: one server, Sentinel or Cluster.

Every Waybill process builds its Redis clients here (dispatch state, the
limiter, ``Prefer: wait``), and the Celery broker's URL is derived from the
same forms (:func:`kombu_broker`). The forms (``docs/scaling.rst``):

``redis://[[user]:password@]host:port/db`` (and ``rediss://``, ``unix://``)
    one server: redis-py's own URL.

``redis+sentinel://[[user]:password@]host:port[,host:port...]/master-name[/db]``
    the master that the listed Sentinels name ``master-name``; the client asks
    them again after a failover. The password is the master's; Sentinels
    that require one of their own take ``?sentinel_password=...``.

``redis+cluster://[[user]:password@]host:port[,host:port...]``
    a Redis Cluster, the listed nodes being where the client starts. Only the
    dispatch state lives there (its keys share one hash slot,
    :mod:`app.dispatch.keys`); kombu has no Cluster transport, so the Celery
    broker must then be RabbitMQ or a Redis of its own (``BROKER_URL``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class MultiHostURL:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    master: str  # Sentinel only
    db: int
    query: dict[str, str]


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [::1]:26379
            host, _, rest = item[1:].partition("]")
            port = int(rest.lstrip(":") or default_port)
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
            port = int(port_text or default_port)
        hosts.append((host, port))
    if not hosts:
        raise ValueError("no host in the Redis URL")
    return tuple(hosts)


def parse_multi_host(url: str) -> MultiHostURL:
    """Parse the Sentinel and Cluster forms; ValueError names what is wrong."""
    scheme, _, rest = url.partition("://")
    authority, _, path_and_query = rest.partition("/")
    path, _, query_text = path_and_query.partition("?")
    if "?" in authority:  # no path: redis+cluster://h:p?x=y
        authority, _, query_text = authority.partition("?")
    userinfo, at, netloc = authority.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    default_port = DEFAULT_SENTINEL_PORT if scheme == SENTINEL_SCHEME else 6379
    query = {k: v[-1] for k, v in parse_qs(query_text).items()}
    parts = [p for p in path.split("/") if p]
    master = ""
    db = 0
    if scheme == SENTINEL_SCHEME:
        if not parts:
            raise ValueError(
                "a redis+sentinel:// URL names the master after the hosts: "
                "redis+sentinel://host:26379,host:26380/mymaster/0"
            )
        master = unquote(parts[0])
        db = int(parts[1]) if len(parts) > 1 else 0
    elif parts:
        db = int(parts[0])
        if db != 0:
            raise ValueError("Redis Cluster has only database 0")
    return MultiHostURL(scheme, _hosts(netloc, default_port), username, password, master, db, query)


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower()


def is_cluster(url: str) -> bool:
    return scheme_of(url) == CLUSTER_SCHEME


def connect(url: str, **kwargs: Any) -> Any:
    """A client for ``url`` (``redis.Redis`` or ``RedisCluster``); ``kwargs`` are redis-py's options."""
    scheme = scheme_of(url)
    if scheme == SENTINEL_SCHEME:
        parsed = parse_multi_host(url)
        sentinel_kwargs: dict[str, Any] = {
            k: kwargs[k] for k in ("socket_connect_timeout", "socket_timeout") if k in kwargs
        }
        if "sentinel_password" in parsed.query:
            sentinel_kwargs["password"] = parsed.query["sentinel_password"]
        sentinel = Sentinel(list(parsed.hosts), sentinel_kwargs=sentinel_kwargs, **kwargs)
        # master_for's pool asks the Sentinels for the master on every new
        # connection, and a connection to a demoted master is dropped on
        # its READONLY error, so clients follow a failover by themselves.
        return sentinel.master_for(
            parsed.master, username=parsed.username, password=parsed.password, db=parsed.db
        )
    if scheme == CLUSTER_SCHEME:
        parsed = parse_multi_host(url)
        kwargs.pop("health_check_interval", None)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
            username=parsed.username,
            password=parsed.password,
            **kwargs,
        )
    return redis.Redis.from_url(url, **kwargs)


def kombu_broker(url: str) -> tuple[str, dict[str, Any]]:
    """The Celery ``broker_url`` and the ``broker_transport_options`` it needs, for ``url``.

    A Sentinel URL becomes kombu's own form (one ``sentinel://`` URL per
    Sentinel, the master's name as a transport option); other URLs are
    kombu's already. A Cluster URL is refused: kombu cannot use one.
    """
    scheme = scheme_of(url)
    if scheme == CLUSTER_SCHEME:
        raise RuntimeError(
            "the Celery broker cannot be a Redis Cluster (kombu has no Cluster transport): "
            "set BROKER_URL to RabbitMQ (amqp://...) or to a Redis of its own"
        )
    if scheme != SENTINEL_SCHEME:
        return url, {}
    parsed = parse_multi_host(url)
    auth = ""
    if parsed.password is not None or parsed.username:
        auth = f"{parsed.username or ''}:{parsed.password or ''}@"
    broker = ";".join(f"sentinel://{auth}{host}:{port}/{parsed.db}" for host, port in parsed.hosts)
    options: dict[str, Any] = {"master_name": parsed.master}
    if "sentinel_password" in parsed.query:
        options["sentinel_kwargs"] = {"password": parsed.query["sentinel_password"]}
    return broker, options
