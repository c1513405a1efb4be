"""A third-party task type, as docs/task-types.rst shows it."""

from marshmallow import Schema, fields

from app.services.task_types import TaskContext, TaskType


class ReverseInput(Schema):
    text = fields.String(required=True)


def reverse(task_input: dict, context: TaskContext) -> dict:
    return {"text": task_input["text"][::-1]}


TASK_TYPE = TaskType(
    name="reverse",
    cost=1,
    description="Reverses a string.",
    handler=reverse,
    input_schema=ReverseInput,
)
