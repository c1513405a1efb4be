"""The task-type registry and the built-in types' handlers."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from app.services import task_types
from app.services.errors import ValidationFailed
from app.services.task_types import Registry, TaskContext, TaskType
from workers.task_types import echo, sleep

CTX = TaskContext(task_id="task_x", organization_id="org_x", attempt=1, allow_private_targets=False)


def test_builtins_come_from_the_entry_point_group() -> None:
    registry = Registry.from_entry_points()
    assert {"echo", "sleep", "http.fetch"} <= set(registry.names())
    assert registry.get("echo") is echo.TASK_TYPE


def test_a_third_party_type_registers_through_an_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint(
        name="reverse", value="tests.unit.plugin_example:TASK_TYPE", group=task_types.ENTRY_POINT_GROUP
    )
    real = task_types.entry_points

    def fake_entry_points(group: str):
        found = list(real(group=group))
        return [*found, ep] if group == task_types.ENTRY_POINT_GROUP else found

    monkeypatch.setattr(task_types, "entry_points", fake_entry_points)
    registry = Registry.from_entry_points()
    reverse = registry.get("reverse")
    assert reverse is not None
    assert reverse.handler(reverse.load_input({"text": "abc"}), CTX) == {"text": "cba"}
    with pytest.raises(ValidationFailed) as exc:
        reverse.load_input({"text": 5})
    assert "input.text" in exc.value.errors


def test_duplicate_and_negative_cost_types_are_refused() -> None:
    registry = Registry([echo.TASK_TYPE])
    with pytest.raises(ValueError):
        registry.add(echo.TASK_TYPE)
    with pytest.raises(ValueError):
        registry.add(TaskType(name="neg", cost=-1, description="", handler=lambda i, c: i))


def test_echo_accepts_any_json_and_returns_it() -> None:
    for value in (None, 1, "s", [1, {"a": None}], {"deep": {"er": [True]}}):
        assert echo.TASK_TYPE.handler(echo.TASK_TYPE.load_input(value), CTX) == value


def test_sleep_validates_and_sleeps() -> None:
    loaded = sleep.TASK_TYPE.load_input({"seconds": 0.05})
    assert sleep.TASK_TYPE.handler(loaded, CTX)["sleptSeconds"] >= 0.05
    for bad in ({"seconds": -1}, {"seconds": 301}, {}, {"seconds": 1, "extra": 2}):
        with pytest.raises(ValidationFailed):
            sleep.TASK_TYPE.load_input(bad)
