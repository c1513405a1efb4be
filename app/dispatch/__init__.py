"""The one seam through which Waybill hands work on: to fair dispatch (Redis) and to Celery.

Use cases call these verbs only after their transaction has committed
(:class:`app.usecases.unit_of_work.UnitOfWork` runs them). Each verb is best
effort: Redis or the broker being away is logged, never raised, because SQL
already holds the truth and the sweep finishes what a verb could not (a task
never enqueued, a webhook never published, a slot never freed comes back when
its lease expires). See ``docs/dispatch.rst``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import redis

from app.dispatch import keys
from app.dispatch.state import Dispatcher, DispatchSettings

log = logging.getLogger("waybill.dispatch")

__all__ = ["Dispatch", "DispatchSettings", "Dispatcher", "Publisher", "TaskLabel", "keys"]


class Publisher(Protocol):
    """Celery, seen from dispatch (``app.broker.CeleryPublisher``; tests record instead)."""

    def run_task(self, task_id: str, label: TaskLabel | None = None) -> None: ...

    def deliver_webhook(self, delivery_id: str, countdown: float | None = None) -> None: ...

    def revoke(self, task_id: str) -> None: ...


@dataclass(frozen=True)
class TaskLabel:
    """What operators see of a run message in Flower: the task's type and organization, never its input."""

    type: str
    organization_id: str


class Dispatch:
    def __init__(
        self,
        state: Callable[[], Dispatcher],
        publisher: Publisher,
        labels: Callable[[list[str]], dict[str, TaskLabel]] | None = None,
    ) -> None:
        self._state = state  # built on first use: a process without Redis can still serve reads
        self.publisher = publisher
        # Looks up the labels of released tasks (one read per publish batch);
        # None, or a failed look-up, publishes without them.
        self._labels = labels

    @property
    def state(self) -> Dispatcher:
        return self._state()

    def enqueue(self, task_id: str, org_id: str, concurrency_limit: int) -> bool:
        """Hand a committed task to dispatch (and release what has room); False leaves it to the sweep.

        Nothing is written to SQL here: the sweep confirms queued tasks
        against Redis later, in batches, and enqueues what Redis lacks.
        """
        try:
            released = self.state.enqueue_and_step(org_id, task_id, concurrency_limit)
        except (redis.RedisError, RuntimeError) as exc:
            log.warning(
                "enqueue failed; the sweep will enqueue the task",
                extra={"event": "task.enqueue_failed", "task_id": task_id, "error": type(exc).__name__},
            )
            return False
        self._publish(released)
        return True

    def enqueue_many(self, task_ids: list[str], org_id: str, concurrency_limit: int) -> bool:
        """Hand committed tasks of one organization to dispatch, in order, in one round trip.

        A batch submission's: the tasks are appended to the organization's
        waiting list in the given order, then one step releases what has
        room. Best effort as :meth:`enqueue`: False leaves them to the sweep.
        """
        if not task_ids:
            return True
        try:
            released = self.state.enqueue_many_and_step(org_id, task_ids, concurrency_limit)
        except (redis.RedisError, RuntimeError) as exc:
            log.warning(
                "enqueue failed; the sweep will enqueue the tasks",
                extra={
                    "event": "task.enqueue_failed",
                    "task_id": task_ids[0],
                    "organization_id": org_id,
                    "status": f"tasks={len(task_ids)}",
                    "error": type(exc).__name__,
                },
            )
            return False
        self._publish(released)
        return True

    def finish(self, task_id: str, status: str | None) -> None:
        """A run ended: free its slot, wake ``Prefer: wait`` requests (``status``), refill the slot.

        One Redis round trip. If Redis is away the lease expires (the claim
        then finds the task final and lets go) and beat's step refills.
        """
        notify = (keys.DONE_CHANNEL + task_id, status) if status else None
        try:
            released = self.state.finish_and_step(task_id, notify=notify)
        except (redis.RedisError, RuntimeError) as exc:
            log.warning(
                "dispatch step failed", extra={"event": "dispatch.failed", "error": type(exc).__name__}
            )
            return
        self._publish(released)

    def release(self, task_id: str, org_id: str = "") -> None:
        """Take a task out of dispatch (its waiting list, or its slot); a lost call ends with its lease."""
        try:
            self.state.release(task_id, org_id)
        except (redis.RedisError, RuntimeError) as exc:
            log.warning("release failed", extra={"event": "dispatch.failed", "error": type(exc).__name__})

    def revoke(self, task_id: str) -> None:
        """Stop a running task's process; best effort, its outcome is discarded anyway."""
        try:
            self.publisher.revoke(task_id)
        except Exception as exc:
            log.warning(
                "revoke failed", extra={"event": "task.revoke_failed", "task_id": task_id, "error": repr(exc)}
            )

    def notify(self, task_id: str, status: str) -> None:
        """Wake the requests holding for this task (``Prefer: wait``)."""
        # Lost, a waiting request still re-reads the task every few seconds.
        with contextlib.suppress(redis.RedisError, RuntimeError):
            self.state.redis.publish(keys.DONE_CHANNEL + task_id, status)

    def deliver(self, delivery_id: str | None, countdown: float | None = None) -> bool:
        """Publish one webhook attempt; a failure is left to the sweep (``next_attempt_at`` is in SQL)."""
        if delivery_id is None:
            return False
        try:
            self.publisher.deliver_webhook(delivery_id, countdown)
        except Exception as exc:
            log.warning(
                "publish failed; the sweep will send the webhook",
                extra={
                    "event": "webhook.publish_failed",
                    "webhook_id": delivery_id,
                    "error": type(exc).__name__,
                },
            )
            return False
        return True

    def step(self) -> int:
        """One dispatch step and its publishes; errors are logged (beat runs another in a second)."""
        try:
            released = self.state.step()
        except (redis.RedisError, RuntimeError) as exc:
            log.warning(
                "dispatch step failed", extra={"event": "dispatch.failed", "error": type(exc).__name__}
            )
            return 0
        return self._publish(released)

    def renew(self, task_id: str, lease_seconds: float, notify: str | None = None) -> None:
        """Extend a run's dispatch lease; Redis briefly away is retried at the next beat.

        ``notify``: a status to publish on the task's channel in the same round
        trip (the run's first renewal says ``running`` to its event streams).
        """
        try:
            self.state.renew(
                task_id,
                lease_seconds,
                notify=(keys.DONE_CHANNEL + task_id, notify) if notify is not None else None,
            )
        except (redis.RedisError, RuntimeError) as exc:
            log.warning(
                "dispatch lease renewal failed",
                extra={"event": "lease.renew_failed", "error": type(exc).__name__},
            )

    def _publish(self, task_ids: Iterable[str]) -> int:
        """Publish a run message per released task; a task whose publish failed is given back."""
        sent = 0
        ids = list(task_ids)
        labels: dict[str, TaskLabel] = {}
        if ids and self._labels is not None:
            try:
                labels = self._labels(ids)
            except Exception as exc:  # a label is for display only: never hold a publish for it
                log.warning(
                    "task labels unavailable", extra={"event": "dispatch.labels_failed", "error": repr(exc)}
                )
        for task_id in ids:
            try:
                self.publisher.run_task(task_id, labels.get(task_id))
                sent += 1
            except Exception as exc:
                log.warning(
                    "publish failed; the task goes back to the front of its list",
                    extra={"event": "task.publish_failed", "task_id": task_id, "error": type(exc).__name__},
                )
                # Left leased, it would hold a slot and the room of a ready
                # task until its release lease (5 min) expired.
                with contextlib.suppress(redis.RedisError, RuntimeError):
                    self.state.give_back(task_id)
        return sent
