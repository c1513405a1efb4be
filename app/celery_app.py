"""The Celery app, bound to the Flask app once (the pattern of Flask's Celery example)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task, signals
from flask import Flask
from kombu import Exchange, Queue

from app import queues
from app.redis_conn import kombu_broker, scheme_of
from app.transport import broker_transport
from config import Settings

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")

log = logging.getLogger("waybill.worker")


def is_amqp(broker_url: str) -> bool:
    return scheme_of(broker_url) in AMQP_SCHEMES


def _amqp_config() -> dict[str, Any]:
    """RabbitMQ: the three queues are quorum queues (replicated, durable, at-least-once).

    Topic exchanges, not the direct ones Celery would create: Celery sends a
    countdown (a webhook retry, up to 16 minutes) through RabbitMQ's native
    delayed delivery when the queues are quorum queues, which routes by
    topic and ignores direct exchanges; the worker would otherwise hold the
    message itself until it is due. Quorum queues support no global QoS:
    Celery sees them (worker_detect_quorum_queues) and uses per-consumer
    prefetch. Publisher confirms make a publish return only once RabbitMQ
    holds the message.
    """
    names = (queues.TASKS_QUEUE, queues.WEBHOOKS_QUEUE, queues.MAINTENANCE_QUEUE)
    return {
        "task_queues": [
            Queue(
                name,
                Exchange(name, type="topic", durable=True),
                routing_key=name,
                durable=True,
                queue_arguments={"x-queue-type": "quorum"},
            )
            for name in names
        ],
        "broker_native_delayed_delivery_queue_type": "quorum",
        "worker_detect_quorum_queues": True,
        "broker_transport_options": {"confirm_publish": True, "connect_timeout": 2},
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    # No placeholder when no broker is configured: a worker, beat or Flower
    # started outside a run used to report a made-up address (127.0.0.1:1)
    # instead of the cause. resolved_redis_url's RuntimeError names REDIS_URL.
    broker, transport_options = kombu_broker(settings.resolved_broker_url())
    sweep = settings.sweep_interval_seconds
    config: dict[str, Any] = {
        "broker_url": broker,
        # kombu's Redis transport with one publishing client per channel
        # (app/transport.py: 9% of a worker's CPU went to building a client
        # per message). A setting rather than a rewritten URL: broker_url
        # stays the operator's redis:// URL, and Flower and `celery inspect`
        # read the same configuration.
        "broker_transport": broker_transport(broker),
        "broker_connection_retry_on_startup": True,
        # At-least-once on Redis: acknowledge after the task ran, give the
        # message back if the worker process dies, take one message at a time.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Longer than the longest webhook countdown (16 min) so scheduled
        # retries are not redelivered while a worker still holds them.
        "broker_transport_options": {
            "visibility_timeout": 3 * 3600,
            "socket_connect_timeout": 2,
            **transport_options,
        },
        # SQL is the source of truth for results; Celery stores none.
        "task_ignore_result": True,
        "result_backend": None,
        # Fail a publish fast when Redis is down: the request still answers
        # 202 and the sweep publishes the task once Redis is back.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "task_default_queue": queues.TASKS_QUEUE,
        "task_routes": {
            "waybill.tasks.*": {"queue": queues.TASKS_QUEUE},
            "waybill.webhooks.*": {"queue": queues.WEBHOOKS_QUEUE},
            "waybill.maintenance.*": {"queue": queues.MAINTENANCE_QUEUE},
        },
        # Flower shows tasks from these events.
        # Flower's task views come from the workers' events (received,
        # started, succeeded/failed): about three broker messages per task
        # (docs/scaling.rst). TASK_EVENTS=false turns them off where nobody
        # watches. The publishers' task-sent event is off: it was one more
        # broker message on every submission's path, and Flower shows a
        # task from "received" on.
        "worker_send_task_events": settings.task_events,
        # The events go out in batches, one broker message per 100 ms at most
        # instead of one per turn of the worker's loop (app/worker_consumer.py).
        "worker_consumer": "app.worker_consumer:BatchedEventsConsumer",
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "sweep": {
                "task": queues.SWEEP,
                "schedule": sweep,
                "options": {"expires": max(sweep * 2, 2.0)},
            },
            "dispatch": {
                "task": queues.DISPATCH_STEP,
                "schedule": settings.dispatch_interval_seconds,
                "options": {"expires": max(settings.dispatch_interval_seconds * 2, 2.0)},
            },
            "retention": {
                "task": queues.RETENTION,
                "schedule": 600.0,
                "options": {"expires": 600.0},
            },
            "reconcile-counters": {
                "task": queues.RECONCILE,
                "schedule": 60.0,
                "options": {"expires": 120.0},
            },
        },
        "include": ["workers.tasks"],
    }
    if is_amqp(broker):
        config.update(_amqp_config())
    return config


def celery_init_app(flask_app: Flask, settings: Settings) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with flask_app.app_context():
                return self.run(*args, **kwargs)

    config = celery_config(settings)
    include = config.pop("include")
    celery = Celery("waybill", task_cls=FlaskTask, include=include)
    celery.conf.update(config)
    celery.set_default()
    flask_app.extensions["celery"] = celery
    if is_amqp(config["broker_url"]):
        signals.worker_init.connect(_declaring_every_queue(celery), weak=False)
    return celery


def _declaring_every_queue(celery: Celery) -> Any:
    """A worker declares all three queues before it starts, not only those it consumes.

    Celery's delayed delivery bootstep binds every queue's exchange to the
    delayed-delivery exchange; a tasks worker that starts before any
    webhooks worker would find no ``webhooks`` exchange and log a failed
    binding. Declaring is idempotent; a broker still away is left to the
    consumer's own connection retries.
    """

    def declare(**_: Any) -> None:
        try:
            with celery.connection_for_write() as conn:
                channel = conn.default_channel
                for queue in celery.amqp.queues.values():
                    queue(channel).declare()
        except Exception as exc:
            log.warning(
                "could not declare the queues", extra={"event": "broker.declare_failed", "error": repr(exc)}
            )

    return declare
