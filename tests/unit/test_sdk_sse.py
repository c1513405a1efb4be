"""waybill_client's Server-Sent Events parser, fed bytes in every kind of chunk."""

from __future__ import annotations

import json
import random

import pytest
from waybill_client import ServerSentEvent, SSEParser, UnexpectedResponse
from waybill_client._core import event_of

STREAM = (
    b": connected\n"
    b"id: 1\n"
    b"event: task.queued\n"
    b'data: {"taskId": "t1", "type": "echo", "status": "queued"}\n'
    b"\n"
    b": keep-alive\n"
    b"\n"
    b"id: 2\n"
    b"event: task.progress\n"
    b'data: {"taskId": "t1",\n'
    b'data:  "type": "echo", "status": "running",\n'
    b'data: "progress": {"fraction": 0.5, "message": "caf\xc3\xa9 \xe2\x98\x95", "updatedAt": null}}\n'
    b"\n"
    b"id: 3\n"
    b"event: task.succeeded\n"
    b'data: {"taskId": "t1", "type": "echo", "status": "succeeded", "result": 1}\n'
    b"\n"
)


def parse_all(chunks: list[bytes]) -> list[ServerSentEvent]:
    parser = SSEParser()
    out: list[ServerSentEvent] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


def expected() -> list[ServerSentEvent]:
    return [
        ServerSentEvent("task.queued", '{"taskId": "t1", "type": "echo", "status": "queued"}', "1"),
        ServerSentEvent(
            "task.progress",
            '{"taskId": "t1",\n "type": "echo", "status": "running",\n'
            '"progress": {"fraction": 0.5, "message": "café ☕", "updatedAt": null}}',
            "2",
        ),
        ServerSentEvent(
            "task.succeeded", '{"taskId": "t1", "type": "echo", "status": "succeeded", "result": 1}', "3"
        ),
    ]


def test_whole_stream_at_once() -> None:
    events = parse_all([STREAM])
    assert events == expected()
    # Each data is the task JSON, multi-line data joined with "\n" (valid JSON again).
    assert json.loads(events[1].data)["progress"]["message"] == "café ☕"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_fixed_size_chunks(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert parse_all(chunks) == expected()


def test_random_chunks_with_every_line_ending() -> None:
    rng = random.Random(1234)
    for ending in (b"\n", b"\r\n", b"\r"):
        stream = STREAM.replace(b"\n", ending)
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
            chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
            assert parse_all(chunks) == expected(), (ending, cuts)


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    # Counted twice, the CRLF would make a blank line and dispatch "a" alone.
    assert parse_all([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [ServerSentEvent("message", "a\nb", None)]
    # A lone CR is a line end of its own; a later LF after other bytes is another.
    assert parse_all([b"data: a\r", b"data: b\r", b"\r"]) == [ServerSentEvent("message", "a\nb", None)]


def test_comments_are_ignored() -> None:
    stream = b":\n: ping\n:data: not data\ndata: x\n: inside an event\ndata: y\n\n"
    assert parse_all([stream]) == [ServerSentEvent("message", "x\ny", None)]
    assert parse_all([b": only comments\n\n: more\n\n"]) == []


def test_field_forms() -> None:
    # No colon: the whole line is the field name, the value empty; only one space is removed.
    stream = b"data\ndata:x\ndata:  two spaces\nevent:named\nunknown: field\n\n"
    assert parse_all([stream]) == [ServerSentEvent("named", "\nx\n two spaces", None)]


def test_id_persists_and_resets_only_when_given() -> None:
    parser = SSEParser()
    events = parser.feed(b"id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: bad\x00id\ndata: d\n\n")
    assert [(e.data, e.id) for e in events] == [("a", "7"), ("b", "7"), ("c", ""), ("d", "")]
    assert parser.last_event_id == ""


def test_event_without_data_is_not_dispatched_but_its_id_is_kept() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 4\nevent: task.progress\n\n") == []
    assert parser.last_event_id == "4"
    # The event type does not leak into the next event.
    assert parser.feed(b"data: z\n\n") == [ServerSentEvent("message", "z", "4")]


def test_retry_takes_digits_only() -> None:
    parser = SSEParser()
    parser.feed(b"retry: 2500\n\nretry: 1.5\n\nretry: soon\n\n")
    assert parser.retry == 2500
    assert parser.feed(b"data: x\n\n") == [ServerSentEvent("message", "x", None, retry=2500)]


def test_incomplete_event_waits_for_its_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 1\nevent: task.started\ndata: {}") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == [ServerSentEvent("task.started", "{}", "1")]


def test_byte_order_mark_at_the_start_is_skipped_even_split() -> None:
    assert parse_all([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [ServerSentEvent("message", "x", None)]
    # Only at the very start: later it is part of the field name.
    assert parse_all([b"data: x\n\n\xef\xbb\xbfdata: y\n\n"]) == [ServerSentEvent("message", "x", None)]


def test_multibyte_character_split_between_chunks() -> None:
    raw = "data: ☕ é\n\n".encode()
    for cut in range(1, len(raw)):
        assert parse_all([raw[:cut], raw[cut:]]) == [ServerSentEvent("message", "☕ é", None)]


def test_empty_chunks_change_nothing() -> None:
    assert parse_all([b"", b"data: a\n", b"", b"\n", b""]) == [ServerSentEvent("message", "a", None)]


def test_task_events_become_events_with_a_task() -> None:
    events = [event_of(e) for e in expected()]
    assert [e.id for e in events if e] == ["1", "2", "3"]
    assert [e.event for e in events if e] == ["task.queued", "task.progress", "task.succeeded"]
    assert [e.is_final for e in events if e] == [False, False, True]
    progress = events[1]
    assert progress is not None and progress.task.progress is not None
    assert progress.task.progress.fraction == 0.5 and progress.task.status == "running"
    assert events[2] is not None and events[2].task.result == 1


def test_other_events_are_skipped_and_bad_task_data_raises() -> None:
    assert event_of(ServerSentEvent("message", "{}", None)) is None
    assert event_of(ServerSentEvent("heartbeat", "not json", "9")) is None
    with pytest.raises(UnexpectedResponse, match="does not hold a task"):
        event_of(ServerSentEvent("task.started", "not json", "9"))
    with pytest.raises(UnexpectedResponse, match="does not hold a task"):
        event_of(ServerSentEvent("task.started", '{"status": "running"}', "9"))
