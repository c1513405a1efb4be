"""The task-type registry.

A task type declares its name, cost, description, input schema (marshmallow)
and handler. Built-in types and third-party ones are all found through the
``waybill.task_types`` entry-point group; see ``docs/task-types.rst``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import entry_points
from typing import Any

from marshmallow import Schema, ValidationError

from app.services.errors import ValidationFailed, messages_to_errors

ENTRY_POINT_GROUP = "waybill.task_types"


class TaskError(Exception):
    """Raised by a handler for an expected failure: the task ends ``failed`` with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TaskContext:
    task_id: str
    organization_id: str
    attempt: int
    allow_private_targets: bool
    # Where progress reports go (the worker's ProgressWriter); None: nowhere.
    reporter: Callable[[float | None, str | None], None] | None = None

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        """Report how far the task is: ``fraction`` from 0 to 1, and/or a short message.

        Returns at once whatever the rate: Waybill keeps the latest report and
        stores about one a second (``docs/task-types.rst``). ValueError for a
        fraction outside 0-1 or neither argument.
        """
        if self.reporter is None:
            checked(fraction, message)  # the same errors, with or without a writer
            return
        self.reporter(fraction, message)


# A progress report's message is cut to this many characters.
MAX_MESSAGE_CHARS = 1000


def checked(fraction: float | None, message: str | None) -> tuple[float | None, str | None]:
    """A report as it is stored; ValueError for what a handler must not send (its own bug)."""
    if fraction is None and message is None:
        raise ValueError("progress needs a fraction, a message, or both")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise ValueError(f"progress fraction must be a number from 0 to 1, not {fraction!r}")
        fraction = float(fraction)
        if not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be from 0 to 1, not {fraction!r}")
    if message is not None:
        if not isinstance(message, str):
            raise ValueError(f"progress message must be a string, not {type(message).__name__}")
        message = message.replace("\x00", "")[:MAX_MESSAGE_CHARS]  # PostgreSQL refuses U+0000
    return fraction, message


@dataclass(frozen=True)
class TaskType:
    name: str
    cost: int
    description: str
    handler: Callable[[Any, TaskContext], Any]
    # None: any JSON value is accepted as input (and ``input`` may be omitted).
    input_schema: type[Schema] | None = None

    def load_input(self, raw: Any) -> Any:
        """Validate ``raw`` and return the input the handler will receive."""
        if self.input_schema is None:
            return raw
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValidationFailed({"input": ["Must be a JSON object."]})
        # First the published schema itself, strictly: marshmallow alone
        # would turn "5" into 5.0 for a field that /v1/task-types says is a number.
        errors: dict[str, list[str]] = {}
        for error in self._validator.iter_errors(raw):
            if error.validator in ("required", "additionalProperties"):
                continue  # marshmallow's messages below name the very field
            where = ".".join(["input", *(str(p) for p in error.absolute_path)])
            errors.setdefault(where, []).append(_jsonschema_message(error))
        if errors:
            raise ValidationFailed(errors)
        try:
            return self.input_schema().load(raw)
        except ValidationError as exc:
            raise ValidationFailed(messages_to_errors(exc.messages, "input")) from None

    def json_schema(self) -> dict[str, Any]:
        if self.input_schema is None:
            return {}
        return marshmallow_to_json_schema(self.input_schema)

    @cached_property
    def _validator(self) -> Any:
        from jsonschema import Draft202012Validator

        return Draft202012Validator(_openapi_to_json_schema(self.json_schema()))


def _openapi_to_json_schema(schema: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema's ``type: [..., "null"]``."""
    if isinstance(schema, list):
        return [_openapi_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _openapi_to_json_schema(v) for k, v in schema.items() if k != "nullable"}
    if schema.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    return out


def _jsonschema_message(error: Any) -> str:
    if error.validator == "type":
        expected = error.validator_value
        names = " or ".join(expected) if isinstance(expected, list) else expected
        return f"Must be of type {names}."
    return f"{error.message[:1].upper()}{error.message[1:]}."[:300]


def marshmallow_to_json_schema(schema: type[Schema]) -> dict[str, Any]:
    # apispec's converter is the same one the OpenAPI document uses, so the
    # schema a client reads in /v1/task-types is the one the API enforces.
    from apispec import APISpec
    from apispec.ext.marshmallow import MarshmallowPlugin

    # A resolver answering None makes apispec inline nested schemas, which
    # is what a self-contained inputSchema needs; its stubs want a str.
    plugin = MarshmallowPlugin(schema_name_resolver=lambda _s: None)  # type: ignore[arg-type,return-value]
    APISpec(title="x", version="1", openapi_version="3.0.3", plugins=[plugin])
    assert plugin.converter is not None
    return dict(plugin.converter.schema2jsonschema(schema))


class Registry:
    def __init__(self, types: Iterable[TaskType] = ()) -> None:
        self._types: dict[str, TaskType] = {}
        for t in types:
            self.add(t)

    def add(self, task_type: TaskType) -> None:
        if not isinstance(task_type, TaskType):
            raise TypeError(f"not a TaskType: {task_type!r}")
        if task_type.name in self._types:
            raise ValueError(f"task type {task_type.name!r} is registered twice")
        if task_type.cost < 0:
            raise ValueError(f"task type {task_type.name!r} has a negative cost")
        self._types[task_type.name] = task_type

    def get(self, name: str) -> TaskType | None:
        return self._types.get(name)

    def __iter__(self) -> Any:
        return iter(sorted(self._types.values(), key=lambda t: t.name))

    def names(self) -> list[str]:
        return sorted(self._types)

    @classmethod
    def from_entry_points(cls) -> Registry:
        registry = cls()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            task_type = ep.load()
            if task_type.name != ep.name:
                raise ValueError(f"entry point {ep.name!r} names a task type called {task_type.name!r}")
            registry.add(task_type)
        return registry
