"""The Celery-backed :class:`~app.dispatch.Publisher`: the only code that sends Celery messages."""

from __future__ import annotations

import contextlib
import math

from celery import Celery

from app.dispatch import TaskLabel
from app.queues import DELIVER_WEBHOOK, MAINTENANCE_QUEUE, RUN_TASK, TASKS_QUEUE, WEBHOOKS_QUEUE


class CeleryPublisher:
    def __init__(self, celery: Celery) -> None:
        self.celery = celery
        self._whole_seconds: bool | None = None

    def _countdown(self, countdown: float | None) -> float | None:
        """On RabbitMQ, a countdown in whole seconds, at least one.

        With quorum queues Celery sends countdowns through RabbitMQ's native
        delayed delivery, whose routing key encodes whole seconds, and kombu
        refuses a countdown under one second (ValueError from
        calculate_routing_key): a retry due in 0.5 s would never be sent.
        Rounding up keeps "not before"; the real schedule (minutes) is unchanged.
        """
        if not countdown or countdown <= 0:
            return None
        if self._whole_seconds is None:
            from app.celery_app import is_amqp

            self._whole_seconds = is_amqp(str(self.celery.conf.broker_url or ""))
        return float(math.ceil(countdown)) if self._whole_seconds else countdown

    def run_task(self, task_id: str, label: TaskLabel | None = None) -> None:
        # The Celery id is the task id: Flower and `celery inspect` show a
        # task under the id clients know, and a revoke reaches every copy.
        # With a label, Flower names the task by its Waybill type
        # ("waybill.tasks.run:http.fetch") and shows its organization beside
        # the id: what an operator needs to tell tasks apart; never the input.
        shown: dict[str, str] = {}
        if label is not None:
            shown = {
                "shadow": f"{RUN_TASK}:{label.type}",
                "argsrepr": f"({task_id!r},) organization={label.organization_id}",
            }
        self.celery.send_task(RUN_TASK, args=[task_id], queue=TASKS_QUEUE, task_id=task_id, **shown)

    def deliver_webhook(self, delivery_id: str, countdown: float | None = None) -> None:
        self.celery.send_task(
            DELIVER_WEBHOOK, args=[delivery_id], queue=WEBHOOKS_QUEUE, countdown=self._countdown(countdown)
        )

    def revoke(self, task_id: str) -> None:
        """Best effort: stop a running task's process; its result is discarded anyway."""
        self.celery.control.revoke(task_id, terminate=True, signal="SIGTERM")

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each of Waybill's queues, read from the broker whichever it is.

        A declare answers on RabbitMQ (the queue's message count) and on
        kombu's Redis transport (its list's length) alike. Passive on
        RabbitMQ, where declaring with other arguments than the workers'
        (quorum) would fail; a queue no worker has declared yet is left out.
        On Redis a passive declare fails for an empty queue (no list).
        """
        depths: dict[str, int] = {}
        with self.celery.connection_for_read() as conn:
            passive = conn.transport.driver_type == "amqp"
            for name in (TASKS_QUEUE, WEBHOOKS_QUEUE, MAINTENANCE_QUEUE):
                # A channel per queue: RabbitMQ closes the channel of a passive
                # declare that finds no queue.
                channel = conn.channel()
                try:
                    depths[name] = int(channel.queue_declare(queue=name, passive=passive).message_count)
                except Exception:
                    continue
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
        return depths
