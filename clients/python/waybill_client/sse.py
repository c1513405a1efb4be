"""A Server-Sent Events parser (the WHATWG "event stream" format), fed bytes in any chunks.

``GET /v1/tasks/{taskId}/events`` answers ``text/event-stream``; the clients
feed each chunk the network gives them to one :class:`SSEParser` and receive
the complete events. The parser is independent of any HTTP library:

    parser = SSEParser()
    for chunk in chunks:
        for event in parser.feed(chunk):
            ...

It follows the HTML standard's rules: lines end with CRLF, LF or CR (a CRLF
split between two chunks counts once); a line starting with ``:`` is a
comment; ``field: value`` loses one space after the colon; several ``data``
lines join with ``\\n``; a blank line ends the event, which is dispatched only
if it has data; ``id`` persists across events (an ``id`` holding U+0000 is
ignored); ``retry`` takes ASCII digits only.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEParser", "ServerSentEvent"]


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: its type (``message`` when unnamed), data, and the last event id."""

    event: str
    data: str
    id: str | None
    retry: int | None = None


class SSEParser:
    """Incremental parser; keeps the partial line and event between :meth:`feed` calls."""

    def __init__(self) -> None:
        self._buffer = b""
        self._first = True  # a UTF-8 BOM at the very start of the stream is skipped
        self._skip_lf = False  # the previous chunk ended with CR: a leading LF is that CRLF's end
        self._data: list[str] = []
        self._event = ""
        self._has_data = False
        self.last_event_id: str | None = None
        #: The reconnection delay (milliseconds) the server asked for last, if any.
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Parse ``chunk``; returns the events it completed, in order."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        data = self._buffer + chunk
        if self._first:
            if len(data) < 3 and b"\xef\xbb\xbf".startswith(data):
                self._buffer = data
                return []
            self._first = False
            data = data.removeprefix(b"\xef\xbb\xbf")
        events: list[ServerSentEvent] = []
        start = 0
        n = len(data)
        while True:
            cr = data.find(b"\r", start)
            lf = data.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                end, next_start = lf, lf + 1
            elif cr + 1 < n:
                end, next_start = cr, cr + (2 if data[cr + 1 : cr + 2] == b"\n" else 1)
            else:
                end, next_start = cr, cr + 1  # CR at the chunk's end: its LF may come next
                self._skip_lf = True
            event = self._line(data[start:end].decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
            start = next_start
        self._buffer = data[start:]
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._has_data:
            self._event = ""
            return None
        event = ServerSentEvent(
            event=self._event or "message",
            data="\n".join(self._data),
            id=self.last_event_id,
            retry=self.retry,
        )
        self._data = []
        self._event = ""
        self._has_data = False
        return event
