"""Bodies over MAX_BODY_BYTES through a real gunicorn: 413 whatever the framing, and the client reads it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select

from app.models import Task
from tests.support import Stack

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024  # MAX_BODY_BYTES of these tests: small, so bodies several times over it are quick


def _exchange(base_url: str, api_key: str, body: bytes, *, chunked: bool) -> bytes:
    """POST ``body`` while reading the answer; returns the status line (raises on a reset)."""
    parts = urlsplit(base_url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()

    def send() -> None:
        try:
            sock.sendall(head)
            for i in range(0, len(body), 16384):
                piece = body[i : i + 16384]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server closed early: the read below tells whether we got an answer first

    sender = threading.Thread(target=send)
    sender.start()
    answer = b""
    try:
        while b"\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    finally:
        sender.join(30)
        sock.close()
    return answer.split(b"\r\n", 1)[0]


def _payload(size: int) -> bytes:
    # Valid JSON all along: were it cut at the limit, what is left would still parse.
    return b'{"type": "echo", "input": "' + b"x" * (size - 30) + b'"}'


@pytest.fixture
def web(make_stack: Callable[..., Stack]) -> Stack:
    stack = make_stack(MAX_BODY_BYTES=str(LIMIT))
    stack.web()
    return stack


def test_a_chunked_body_over_the_limit_is_413_and_stores_nothing(web: Stack) -> None:
    org = web.org("chunky")
    assert _exchange(web.base_url, org.api_key, _payload(LIMIT // 2), chunked=True).startswith(
        b"HTTP/1.1 202"
    )
    assert _exchange(web.base_url, org.api_key, _payload(LIMIT * 3), chunked=True).startswith(b"HTTP/1.1 413")
    with web.db.session() as s:
        assert s.execute(select(func.count()).select_from(Task)).scalar_one() == 1


def test_clients_sending_too_much_read_the_413_instead_of_a_reset(web: Stack) -> None:
    org = web.org("bulky")
    body = _payload(LIMIT * 8)

    def one(i: int) -> bytes:
        try:
            return _exchange(web.base_url, org.api_key, body, chunked=bool(i % 2))
        except ConnectionResetError:
            return b"reset"

    with ThreadPoolExecutor(16) as pool:
        lines = list(pool.map(one, range(48)))
    assert all(line.startswith(b"HTTP/1.1 413") for line in lines), sorted(set(lines))
