"""kombu's Redis transport, publishing through one ``redis.Redis`` client per channel.

kombu 5's ``Channel.conn_or_acquire`` builds a ``redis.Redis`` object for
every message and every event it publishes (the TCP connection comes from the
channel's pool either way). Building one takes about 70 us with redis-py 8,
and a task publishes four or five (its message, the ``task-sent``,
``task-received``, ``task-started`` and ``task-succeeded`` events Flower
reads): 9% of a Celery worker's CPU in py-spy profiles. This channel keeps one
client on its own pool and builds a new one only when the channel has replaced
its pool (kombu drops a channel's pools in a forked child and on close).

The transport is registered under its own alias and Celery selects it through
the ``broker_transport`` setting (:func:`broker_transport`), so the operator's
``REDIS_URL`` stays a plain ``redis://`` URL and processes that do not build
Waybill's Celery app (the benchmarks' baselines) run kombu as shipped.

It relies on kombu internals (``Channel.conn_or_acquire``,
``Channel._create_client``, ``Channel.pool``): setup.cfg bounds kombu's
version and tests/unit/test_transport.py fails when they change, or when kombu
stops building a client per message (the subclass can go then).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from kombu.connection import resolve_aliases
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

TRANSPORT_ALIAS = "waybill-redis"
TLS_TRANSPORT_ALIAS = "waybill-rediss"


class Channel(kombu_redis.Channel):
    # The client the publishing path (and the other non-blocking commands that
    # go through conn_or_acquire) reuses; built on the first use.
    _reused_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        # ``pool`` builds a new pool when kombu dropped the old one (``_pool``
        # set to None after a fork or on close): a client bound to the old,
        # disconnected pool must not be handed out again.
        pool = self.pool
        reused = self._reused_client
        if reused is None or reused.connection_pool is not pool:
            reused = self._reused_client = self._create_client()
        yield reused


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT_ALIASES[TRANSPORT_ALIAS] = "app.transport:Transport"
TRANSPORT_ALIASES[TLS_TRANSPORT_ALIAS] = "app.transport:Transport"
# Connection.as_uri() writes the transport's name as the URL's scheme, and
# Flower builds its broker page's Redis client from that URL by scheme
# (flower/utils/broker.py knows redis and rediss, not our aliases). kombu's
# resolve_aliases is the table that already shows ``pyamqp`` as ``amqp``.
resolve_aliases[TRANSPORT_ALIAS] = "redis"
resolve_aliases[TLS_TRANSPORT_ALIAS] = "rediss"


def broker_transport(broker_url: str) -> str | None:
    """Celery's ``broker_transport`` for ``broker_url``: our alias, or None for kombu's own choice.

    An explicit transport takes precedence over the URL's scheme, so it is
    given only for Redis over TCP. ``rediss://`` only with ``ssl_*``
    parameters in the URL: without them kombu turns TLS on from the scheme's
    name (``Connection._init_params`` tests ``transport == 'rediss'``), which
    a renamed transport would lose, sending the password in clear text.
    Anything else (``redis+socket://``, ``sentinel://``, ``amqp://``) keeps
    kombu's transport.
    """
    parts = urlsplit(broker_url)
    if parts.scheme == "redis":
        return TRANSPORT_ALIAS
    # kombu's url_to_parts drops blank values the same way (parse_qsl's default).
    if parts.scheme == "rediss" and any(key.startswith("ssl_") for key, _ in parse_qsl(parts.query)):
        return TLS_TRANSPORT_ALIAS
    return None
