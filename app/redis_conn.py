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
from urllib.parse import quote, unquote

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379
SENTINEL_FORM = "redis+sentinel://[[user]:password@]host:port[,host:port...]/master-name[/db]"
CLUSTER_FORM = "redis+cluster://[[user]:password@]host:port[,host:port...]"
# The query options each form reads; any other is refused rather than ignored
# (a silently dropped ``?ssl=true`` or ``?password=`` would be worse).
QUERY_OPTIONS = {SENTINEL_SCHEME: ("sentinel_password",), CLUSTER_SCHEME: ()}


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


def _port(text: str, item: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"the port of {item!r} in the Redis URL is not a port number (1-65535)")
    return int(text)


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = []
    for raw in netloc.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("["):  # [::1]:26379
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"{item!r} in the Redis URL: write an IPv6 address as [::1]:26379")
            port = _port(rest[1:], item) if rest else default_port
        elif item.count(":") > 1:
            raise ValueError(f"{item!r} in the Redis URL: write an IPv6 address in brackets, as [::1]:26379")
        else:
            host, colon, port_text = item.partition(":")
            port = _port(port_text, item) if colon else default_port
        if not host:
            raise ValueError(f"{item!r} in the Redis URL names no host")
        hosts.append((host, port))
    if not hosts:
        raise ValueError("no host in the Redis URL")
    return tuple(hosts)


def _query(text: str, scheme: str) -> dict[str, str]:
    """``a=b&c=d``, percent-decoded; a ``+`` stays a ``+`` (it may be part of a password)."""
    query: dict[str, str] = {}
    for pair in text.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        name = unquote(name)
        if name not in QUERY_OPTIONS[scheme]:
            known = ", ".join(QUERY_OPTIONS[scheme]) or "none"
            raise ValueError(f"unknown option {name!r} in the {scheme}:// URL (options: {known})")
        query[name] = unquote(value)
    return query


def _db(text: str, url_form: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a database number: {url_form}")
    return int(text)


def parse_multi_host(url: str) -> MultiHostURL:
    """Parse the Sentinel and Cluster forms; ValueError names what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise ValueError(
            f"not a {SENTINEL_SCHEME}:// or {CLUSTER_SCHEME}:// URL: {SENTINEL_FORM} or {CLUSTER_FORM}"
        )
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
    default_port = DEFAULT_SENTINEL_PORT if scheme == SENTINEL_SCHEME else DEFAULT_REDIS_PORT
    query = _query(query_text, scheme)
    parts = [p for p in path.split("/") if p]
    master = ""
    db = 0
    if scheme == SENTINEL_SCHEME:
        if not parts:
            raise ValueError(
                "a redis+sentinel:// URL names the master after the hosts: "
                "redis+sentinel://host:26379,host:26380/mymaster/0"
            )
        if len(parts) > 2:
            raise ValueError(f"too many path parts in the redis+sentinel:// URL: {SENTINEL_FORM}")
        master = unquote(parts[0])
        db = _db(parts[1], SENTINEL_FORM) if len(parts) > 1 else 0
    elif parts and (len(parts) > 1 or _db(parts[0], CLUSTER_FORM) != 0):
        raise ValueError(f"Redis Cluster has only database 0: {CLUSTER_FORM}")
    return MultiHostURL(scheme, _hosts(netloc, default_port), username, password, master, db, query)


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-case ("" for none); never raises, whatever follows it."""
    scheme, sep, _ = url.partition("://")
    return scheme.strip().lower() if sep else ""


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
        try:
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
                username=parsed.username,
                password=parsed.password,
                **kwargs,
            )
        except RedisClusterException as exc:
            # No startup node answered: redis-py's RedisClusterException is
            # no RedisError, and every caller treats a Redis that is away as
            # a RedisError (logged, the sweep repairs), not as a crash.
            raise redis.ConnectionError(str(exc)) from exc
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
        # kombu percent-decodes them: a password holding @, : or / must go encoded.
        auth = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password or '', safe='')}@"
    broker = ";".join(
        f"sentinel://{auth}{f'[{host}]' if ':' in host else host}:{port}/{parsed.db}"
        for host, port in parsed.hosts
    )
    options: dict[str, Any] = {"master_name": parsed.master}
    if "sentinel_password" in parsed.query:
        options["sentinel_kwargs"] = {"password": parsed.query["sentinel_password"]}
    return broker, options
