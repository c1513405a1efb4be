"""Outbound HTTP for webhooks and ``http.fetch``, guarded against SSRF.

Every request resolves its host, refuses any address that is not public
(unless the operator allows private targets), and then connects to exactly the
address it checked: there is no second DNS look-up for a rebinding attacker to
answer differently. Redirects are never followed; each request has one
wall-clock deadline, enforced by a watchdog that shuts the socket, and reads at
most ``max_bytes`` of the body.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges that ``is_global`` alone does not exclude, or that hide an IPv4
# address inside an IPv6 one.
_EXTRA_FORBIDDEN = [
    ipaddress.ip_network("100.64.0.0/10"),  # CGNAT
    ipaddress.ip_network("192.0.0.0/24"),
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS metadata over IPv6
    # Newer than some Pythons' tables of special ranges (RFC 9637: documentation).
    ipaddress.ip_network("3fff::/20"),
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


class UnsafeTarget(Exception):
    """The URL is malformed, not http(s), or points at a forbidden address."""


class OutboundError(Exception):
    """The request could not be completed; ``kind`` is a short error class."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def is_forbidden_address(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_forbidden_address(embedded)
    if any(ip in net for net in _EXTRA_FORBIDDEN if net.version == ip.version):
        return True
    return (
        not ip.is_global
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_unspecified
        # Deprecated site-local IPv6 (fec0::/10) is still routed inside some
        # networks, and `is_global` calls it global.
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    )


def literal_address(host: str) -> IPAddress | None:
    """The address a host names literally, including legacy IPv4 forms.

    ``2130706433``, ``0x7f000001``, ``0177.0.0.1`` and ``127.1`` all mean
    127.0.0.1 to the C resolver, so they are read the same way here.
    """
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if all(c in "0123456789abcdefxABCDEFX." for c in h) and h[:1].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent on the request line


def parse_url(url: str) -> Target:
    if not isinstance(url, str) or not url:
        raise UnsafeTarget("URL is empty")
    if len(url) > 2048:
        raise UnsafeTarget("URL is longer than 2048 characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UnsafeTarget("URL contains whitespace or control characters")
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeTarget(f"URL is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeTarget("URL scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTarget("URL must not contain credentials")
    host = parts.hostname
    if not host:
        raise UnsafeTarget("URL has no host")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise UnsafeTarget("URL host is not a valid name") from None
    # The request line is ASCII: a path or query with other characters
    # (``/café``) is sent percent-encoded as UTF-8, as browsers do;
    # what is already percent-encoded, and every reserved character, is kept.
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path = f"{path}?{quote(parts.query, safe=_QUERY_SAFE)}"
    return Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port or (443 if scheme == "https" else 80),
        path=path,
    )


def resolve(target: Target, *, allow_private: bool) -> IPAddress:
    """The one address to connect to, after checking every address of the host."""
    literal = literal_address(target.host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        if (
            target.host.rstrip(".").lower() in ("localhost", "metadata.google.internal")
            or (target.host.rstrip(".").lower().endswith(".localhost"))
        ) and not allow_private:
            raise UnsafeTarget(f"host {target.host} is a local name")
        try:
            infos = socket.getaddrinfo(target.host, target.port, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            raise UnsafeTarget(f"host {target.host} does not resolve: {exc}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise UnsafeTarget(f"host {target.host} does not resolve")
    if not allow_private:
        for ip in addresses:
            if is_forbidden_address(ip):
                raise UnsafeTarget(f"host {target.host} resolves to a non-public address ({ip})")
    return addresses[0]


def check_url(url: str, *, allow_private: bool) -> Target:
    target = parse_url(url)
    resolve(target, allow_private=allow_private)
    return target


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    truncated: bool
    elapsed_ms: int
    address: str = ""


def request(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float,
    max_bytes: int,
    allow_private: bool,
) -> Response:
    """Send one request with a hard ``timeout`` on the whole exchange."""
    started = time.monotonic()
    deadline = started + timeout
    target = parse_url(url)
    address = resolve(target, allow_private=allow_private)

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OutboundError("timeout", f"no complete answer within {timeout:g}s")
        return left

    sock: socket.socket | None = None
    timed_out = threading.Event()

    def watchdog() -> None:
        timed_out.set()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(timeout, watchdog)
    timer.daemon = True
    timer.start()
    try:
        try:
            raw = socket.create_connection((str(address), target.port), timeout=remaining())
            sock = raw
            if target.scheme == "https":
                context = ssl.create_default_context()
                sock = context.wrap_socket(raw, server_hostname=target.host)
            conn_cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
            conn = conn_cls(target.host, target.port, timeout=remaining())
            conn.sock = sock  # connect() is skipped: we connected to the checked address
            conn.request(method, target.path, body=body, headers=headers or {})
            sock.settimeout(remaining())
            resp = conn.getresponse()
            chunks: list[bytes] = []
            size = 0
            truncated = False
            while size <= max_bytes:
                sock.settimeout(remaining())
                chunk = resp.read1(min(65536, max_bytes + 1 - size)) if size < max_bytes + 1 else b""
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if timed_out.is_set():
                # The watchdog shut the socket: what we read looks like an
                # end of body but is a cut-off answer.
                raise OutboundError("timeout", f"no complete answer within {timeout:g}s")
            data = b"".join(chunks)
            if len(data) > max_bytes:
                data = data[:max_bytes]
                truncated = True
            return Response(
                status=resp.status,
                headers=list(resp.getheaders()),
                body=data,
                truncated=truncated,
                elapsed_ms=int((time.monotonic() - started) * 1000),
                address=str(address),
            )
        except OutboundError:
            raise
        except TimeoutError:
            raise OutboundError("timeout", f"no complete answer within {timeout:g}s") from None
        except ssl.SSLError as exc:
            raise OutboundError("tls_error", f"TLS error: {exc.reason or exc}") from None
        except ConnectionRefusedError:
            raise OutboundError("connection_refused", "connection refused") from None
        except (http.client.HTTPException, OSError) as exc:
            if timed_out.is_set():
                raise OutboundError("timeout", f"no complete answer within {timeout:g}s") from None
            kind = "connection_error" if isinstance(exc, OSError) else "protocol_error"
            raise OutboundError(kind, f"{type(exc).__name__}") from None
    finally:
        timer.cancel()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
