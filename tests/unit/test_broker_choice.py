"""BROKER_URL: which broker Celery uses, and what it is told on each."""

from __future__ import annotations

import pytest
from celery import Celery

from app.broker import CeleryPublisher
from app.celery_app import celery_config
from config import Settings


def _config(**env: str) -> dict:
    return celery_config(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/3", **env}))


def test_the_broker_is_redis_url_unless_broker_url_says_otherwise() -> None:
    assert _config()["broker_url"] == "redis://127.0.0.1:1/3"
    assert "task_queues" not in _config()  # kombu's Redis lists, as before
    amqp = _config(BROKER_URL="amqp://guest:guest@127.0.0.1:5672/vh")
    assert amqp["broker_url"] == "amqp://guest:guest@127.0.0.1:5672/vh"
    assert amqp["broker_transport"] is None  # kombu's amqp transport, not the Redis subclass


def test_rabbitmq_queues_are_quorum_queues_on_topic_exchanges() -> None:
    config = _config(BROKER_URL="amqp://guest:guest@127.0.0.1:5672/")
    queues = {q.name: q for q in config["task_queues"]}
    assert set(queues) == {"tasks", "webhooks", "maintenance"}
    for name, queue in queues.items():
        assert queue.queue_arguments == {"x-queue-type": "quorum"}
        # Native delayed delivery (countdowns) routes by topic; a direct
        # exchange would leave the countdown to a worker holding the message.
        assert queue.exchange.type == "topic" and queue.routing_key == name and queue.durable
    assert config["broker_transport_options"]["confirm_publish"] is True
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]


def test_a_sentinel_redis_url_becomes_kombus_sentinel_form() -> None:
    config = _config(REDIS_URL="redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/2")
    assert config["broker_url"] == "sentinel://:pw@127.0.0.1:26379/2;sentinel://:pw@127.0.0.1:26380/2"
    assert config["broker_transport_options"]["master_name"] == "mymaster"


def test_a_cluster_cannot_be_the_broker() -> None:
    with pytest.raises(RuntimeError, match="BROKER_URL"):
        _config(REDIS_URL="redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    # ...but holds dispatch state beside RabbitMQ.
    assert _config(REDIS_URL="redis+cluster://127.0.0.1:7000", BROKER_URL="amqp://g:g@127.0.0.1/")


@pytest.mark.parametrize(
    ("broker", "countdown", "sent"),
    [
        ("redis://127.0.0.1:1/0", 0.5, 0.5),
        ("redis://127.0.0.1:1/0", None, None),
        ("amqp://g:g@127.0.0.1:1/", 0.5, 1.0),  # kombu refuses under 1 s on native delayed delivery
        ("amqp://g:g@127.0.0.1:1/", 120.4, 121.0),
        ("amqp://g:g@127.0.0.1:1/", 0.0, None),
    ],
)
def test_countdowns_are_whole_seconds_on_rabbitmq(
    broker: str, countdown: float | None, sent: float | None
) -> None:
    app = Celery("t", broker=broker)
    sends: list[dict] = []
    app.send_task = lambda *a, **kw: sends.append(kw)
    CeleryPublisher(app).deliver_webhook("msg_1", countdown)
    assert sends[0]["countdown"] == sent
