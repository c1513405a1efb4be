"""A task's events (``GET /v1/tasks/{id}/events``), derived from its stored row.

No event table: every transaction that moves a task already stores what an
event says (``created_at``, ``started_at``, the latest ``progress`` and how
many reports were stored, the final status and its result or error), so the
history is read back from the row, at no cost on the run path. Ids are
derived so that they increase along the task's life and a client's
``Last-Event-ID`` keeps its meaning across reconnects and web processes:

* ``1`` ``task.queued``; ``2`` ``task.started`` (once, however many attempts);
* ``2 + n`` ``task.progress`` for the n-th stored report. Only the latest
  report is kept, so a stream that was not connected sees the reports it
  missed coalesced into the latest one (docs/api.md allows it);
* ``3 + n`` the final event, after the n reports.

Each event's data is the task as it was at that event: the fields that
change later (status, ``startedAt``, ``completedAt``, result, error,
progress) are set back to what they were then; the others are as stored now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.models import Task, TaskStatus
from app.services.representation import FINAL_EVENTS, represent

QUEUED_ID, STARTED_ID = 1, 2


@dataclass(frozen=True)
class TaskEvent:
    id: int
    event: str
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        return self.event in FINAL_EVENTS


def events_of(task: Task) -> list[TaskEvent]:
    """Every event of the task so far, in id order."""
    now = represent(task)
    status = TaskStatus(task.status)
    seq = task.progress_seq or 0
    queued = {**_before_end(now), "status": TaskStatus.QUEUED.value, "startedAt": None, "progress": None}
    out = [TaskEvent(QUEUED_ID, "task.queued", queued)]
    if task.started_at is not None:
        started = {**_before_end(now), "status": TaskStatus.RUNNING.value, "progress": None}
        out.append(TaskEvent(STARTED_ID, "task.started", started))
        if seq > 0 and task.progress is not None:
            running = {**_before_end(now), "status": TaskStatus.RUNNING.value}
            out.append(TaskEvent(STARTED_ID + seq, "task.progress", running))
    if status.is_final:
        out.append(TaskEvent(STARTED_ID + seq + 1, f"task.{status.value}", now))
    return out


def _before_end(representation: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in representation.items() if k not in ("result", "error")}
    out["completedAt"] = None
    return out


def parse_last_event_id(header: str | None) -> int:
    """``Last-Event-ID`` as an event id; anything else (absent, not ours) replays from the start."""
    if header is None:
        return 0
    text = header.strip()
    if not text.isdigit() or len(text) > 12:
        return 0
    return int(text)
