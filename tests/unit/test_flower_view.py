"""What operators see in Flower: tasks named by their Waybill type and organization, no maintenance ticks."""

from __future__ import annotations

from typing import Any

import fakeredis

from app.broker import CeleryPublisher
from app.dispatch import Dispatch, Dispatcher, TaskLabel
from app.queues import RUN_TASK
from tests.conftest import RecordingPublisher


class _Celery:
    """Records send_task calls (what Celery would put in the message's headers)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.conf = type("Conf", (), {"broker_url": "redis://127.0.0.1:1/0"})()

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append({"name": name, **kwargs})


def test_a_labelled_run_message_shows_type_and_organization_never_the_input() -> None:
    celery = _Celery()
    publisher = CeleryPublisher(celery)
    publisher.run_task("task_1", TaskLabel("http.fetch", "org_9"))
    publisher.run_task("task_2")
    labelled, bare = celery.sent
    assert labelled["shadow"] == f"{RUN_TASK}:http.fetch"
    assert labelled["argsrepr"] == "('task_1',) organization=org_9"
    assert labelled["args"] == ["task_1"] and labelled["task_id"] == "task_1"
    assert "shadow" not in bare and "argsrepr" not in bare


class _Labelled(RecordingPublisher):
    def __init__(self) -> None:
        super().__init__()
        self.labels: list[object] = []

    def run_task(self, task_id: str, label: object = None) -> None:
        super().run_task(task_id)
        self.labels.append(label)


def test_dispatch_labels_what_it_releases_and_publishes_without_labels_when_the_look_up_fails() -> None:
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    asked: list[list[str]] = []

    def labels(ids: list[str]) -> dict[str, TaskLabel]:
        asked.append(ids)
        return {i: TaskLabel("echo", "org_a") for i in ids}

    publisher = _Labelled()
    assert Dispatch(lambda: Dispatcher(redis), publisher, labels).enqueue("t1", "org_a", 5)
    assert publisher.tasks == ["t1"] and publisher.labels == [TaskLabel("echo", "org_a")]
    assert asked == [["t1"]]

    def broken(_ids: list[str]) -> dict[str, TaskLabel]:
        raise RuntimeError("database away")

    publisher = _Labelled()
    assert Dispatch(lambda: Dispatcher(redis), publisher, broken).enqueue("t2", "org_b", 5)
    assert publisher.tasks == ["t2"] and publisher.labels == [None]


def test_maintenance_tasks_send_no_events_and_the_organizations_tasks_do() -> None:
    import workers.tasks as tasks

    for task in (tasks.sweep_task, tasks.dispatch_step, tasks.retention_task, tasks.reconcile_task):
        assert task.send_events is False, task.name
    for task in (tasks.run_task, tasks.deliver_webhook):
        assert task.send_events is True, task.name
