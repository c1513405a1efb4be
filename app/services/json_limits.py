"""What every JSON value Waybill stores must be: shallow enough, and storable.

A value nested hundreds of levels deep decodes and encodes by recursion, and
the worker that loads it (far deeper in its own stack than the web request
that accepted it) hits ``RecursionError``; a string holding U+0000 or a lone
surrogate cannot be stored in PostgreSQL's JSONB at all. Both are refused
where they enter -- the request body (``docs/api.md``: 32 levels, no U+0000)
and a handler's result -- by one iterative walk that cannot itself recurse.
"""

from __future__ import annotations

from typing import Any

MAX_INPUT_DEPTH = 32  # input and metadata, as the spec states
MAX_RESULT_DEPTH = 64  # a handler's result; docs/task-types.rst


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _bad_string(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain U+0000"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (a lone surrogate is not)"
    return None


def violation(value: Any, *, max_depth: int | None, path: str = "") -> tuple[str, str] | None:
    """The first place (path, reason) where ``value`` breaks the rules, or None.

    Depth counts containers: ``{"a": [1]}`` is 2 levels, a scalar 0.
    ``max_depth=None`` checks the strings only.
    """
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            reason = _bad_string(item)
            if reason is not None:
                return where or "body", reason
        elif isinstance(item, dict | list):
            if max_depth is not None and depth + 1 > max_depth:
                return where or "body", f"is nested more than {max_depth} levels deep"
            if isinstance(item, dict):
                children: list[tuple[Any, str]] = []
                for key, child in item.items():
                    reason = _bad_string(str(key))
                    if reason is not None:
                        return _join(where, str(key)), f"key {reason}"
                    children.append((child, _join(where, str(key))))
            else:
                children = [(child, _join(where, i)) for i, child in enumerate(item)]
            # Reversed onto the stack: the first bad field in document order is found first.
            stack.extend((child, p, depth + 1) for child, p in reversed(children))
    return None
