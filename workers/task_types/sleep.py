from __future__ import annotations

import time
from typing import Any

from marshmallow import RAISE, Schema, fields, validate

from app.services.task_types import TaskContext, TaskType


class SleepInput(Schema):
    class Meta:
        unknown = RAISE

    seconds = fields.Float(required=True, allow_nan=False, validate=validate.Range(min=0, max=300))


# How often sleep reports its progress; the writer stores about one a second.
PROGRESS_EVERY_SECONDS = 0.5


def handle(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    seconds = task_input["seconds"]
    started = time.monotonic()
    end = started + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, PROGRESS_EVERY_SECONDS))
        slept = min(time.monotonic() - started, seconds)
        if slept < seconds:  # the final event says "done"; no report of 100% before it
            context.progress(slept / seconds, f"slept {slept:.1f} of {seconds:g} s")
    return {"sleptSeconds": round(time.monotonic() - started, 3)}


TASK_TYPE = TaskType(
    name="sleep",
    cost=1,
    description="Waits `seconds` (0 to 300), reporting its progress, then returns how long it slept.",
    handler=handle,
    input_schema=SleepInput,
)
