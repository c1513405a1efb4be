from __future__ import annotations

import time
from typing import Any

from marshmallow import RAISE, Schema, fields, validate

from app.services.task_types import TaskContext, TaskType


class SleepInput(Schema):
    class Meta:
        unknown = RAISE

    seconds = fields.Float(required=True, allow_nan=False, validate=validate.Range(min=0, max=300))


def handle(task_input: dict[str, Any], _context: TaskContext) -> dict[str, Any]:
    started = time.monotonic()
    time.sleep(task_input["seconds"])
    return {"sleptSeconds": round(time.monotonic() - started, 3)}


TASK_TYPE = TaskType(
    name="sleep",
    cost=1,
    description="Waits `seconds` (0 to 300), then returns how long it slept.",
    handler=handle,
    input_schema=SleepInput,
)
