"""kombu's Redis transport as Waybill runs it: one publishing client per channel."""

from __future__ import annotations

import uuid

import pytest
from kombu import Connection

from app.transport import broker_transport

pytestmark = pytest.mark.integration


def test_a_channel_publishes_through_one_client_and_messages_still_arrive(shared_redis_url: str) -> None:
    name = f"waybill-test-{uuid.uuid4().hex}"
    # The transport Waybill's Celery app selects for this URL (app/transport.py).
    with Connection(shared_redis_url, transport=broker_transport(shared_redis_url)) as conn:
        queue = conn.SimpleQueue(name)
        try:
            channel = conn.default_channel
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second
            for i in range(3):
                queue.put({"n": i})
            # kombu drops its pools after a connection error: the next
            # publish must not go through a client bound to the old pool.
            channel._pool = None
            with channel.conn_or_acquire() as third:
                assert third is not first and third.connection_pool is channel.pool
            queue.put({"n": 3})
            got = []
            for _ in range(4):
                message = queue.get(timeout=5)
                got.append(message.payload["n"])
                message.ack()
            assert got == [0, 1, 2, 3]
        finally:
            queue.clear()
            queue.close()
            with channel.conn_or_acquire() as client:
                client.delete(name)
