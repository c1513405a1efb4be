"""SSRF protection and the outbound request's deadline and read limit."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.services import outbound

HOSTILE = [
    "http://127.0.0.1/",
    "http://127.0.0.2:8080/x",
    "http://localhost/",
    "http://foo.localhost/",
    "http://[::1]/",
    "http://[::]/",
    "http://0.0.0.0/",
    "http://0/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/",
    "http://100.64.0.1/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd00:ec2::254]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[2002:7f00:1::]/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://198.18.0.1/",
    "ftp://example.com/",
    "file:///etc/passwd",
    "gopher://example.com/",
    "javascript:alert(1)",
    "http://user:pass@example.com/",
    "http:///nohost",
    "http://exa mple.com/",
    "http://example.com/\r\nX-Injected: 1",
    "http://example.com:99999/",
]


@pytest.mark.parametrize("url", HOSTILE)
def test_hostile_urls_are_refused(url: str) -> None:
    with pytest.raises(outbound.UnsafeTarget):
        outbound.check_url(url, allow_private=False)


def test_allow_private_lifts_the_address_check_but_not_the_scheme_check() -> None:
    outbound.check_url("http://127.0.0.1:1/", allow_private=True)
    with pytest.raises(outbound.UnsafeTarget):
        outbound.check_url("file:///etc/passwd", allow_private=True)


def test_public_literal_is_accepted() -> None:
    assert outbound.check_url("https://93.184.215.14/x?y=1", allow_private=False).path == "/x?y=1"


def test_a_name_resolving_to_loopback_never_gets_a_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = socket.socket()
    canary.bind(("127.0.0.1", 0))
    canary.listen(1)
    canary.settimeout(0.3)
    port = canary.getsockname()[1]
    real = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):  # a hostile DNS answer
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with pytest.raises(outbound.UnsafeTarget):
        outbound.request(
            "GET", f"http://rebind.example:{port}/", timeout=1, max_bytes=10, allow_private=False
        )
    with pytest.raises(TimeoutError):
        canary.accept()
    canary.close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        # The client gives up at its deadline, as the tests want.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._answer()

    def _answer(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
        if self.path == "/drip":
            self.send_response(200)
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
            return
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Test", "yes")
        self.end_headers()
        self.wfile.write(b"y" * 100_000 if self.path == "/big" else b"hello")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_request_reads_status_headers_and_body(server: str) -> None:
    r = outbound.request("GET", server + "/", timeout=2, max_bytes=100, allow_private=True)
    assert r.status == 200 and r.body == b"hello" and not r.truncated
    assert ("X-Test", "yes") in r.headers


def test_request_reads_at_most_max_bytes(server: str) -> None:
    r = outbound.request("GET", server + "/big", timeout=2, max_bytes=1000, allow_private=True)
    assert len(r.body) == 1000 and r.truncated


def test_redirects_are_not_followed(server: str) -> None:
    r = outbound.request("GET", server + "/redirect", timeout=2, max_bytes=100, allow_private=True)
    assert r.status == 302


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_deadline_bounds_the_whole_exchange(server: str, path: str) -> None:
    started = time.monotonic()
    with pytest.raises(outbound.OutboundError) as exc:
        outbound.request("GET", server + path, timeout=0.8, max_bytes=10_000, allow_private=True)
    assert exc.value.kind == "timeout"
    assert time.monotonic() - started < 1.5


def test_refused_connection_is_a_short_error_class() -> None:
    with pytest.raises(outbound.OutboundError) as exc:
        outbound.request("GET", "http://127.0.0.1:1/", timeout=1, max_bytes=10, allow_private=True)
    assert exc.value.kind == "connection_refused"
