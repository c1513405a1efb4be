from __future__ import annotations

from typing import Any

from app.services.task_types import TaskContext, TaskType


def handle(task_input: Any, _context: TaskContext) -> Any:
    return task_input


TASK_TYPE = TaskType(
    name="echo",
    cost=1,
    description="Returns its input unchanged. Any JSON value is accepted.",
    handler=handle,
)
