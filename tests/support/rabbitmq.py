"""A RabbitMQ virtual host of one's own, for a test, a scale run or a benchmark.

Queue names are fixed (``tasks``, ``webhooks``, ``maintenance``), so two
runs on one RabbitMQ (CI's passes side by side) would consume each other's
messages; a virtual host per run keeps them apart, as Redis database indexes
do. ``rabbitmqctl`` ships with the server and answers in about 0.3 s.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

AMQP_URL_ENV = "TEST_AMQP_URL"  # e.g. amqp://guest:guest@127.0.0.1:5672/ (CI sets it for the RabbitMQ pass)


def rabbitmqctl(*args: str) -> str:
    path = shutil.which("rabbitmqctl")
    if path is None:
        raise RuntimeError("rabbitmqctl not found: RabbitMQ's server package provides it")
    done = subprocess.run([path, *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def with_vhost(base_url: str, name: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def vhost_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@contextlib.contextmanager
def vhost(base_url: str, prefix: str = "waybill-test") -> Iterator[str]:
    """A new virtual host on the RabbitMQ of ``base_url`` (its user gets every right); its URL."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    user = urlsplit(base_url).username or "guest"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield with_vhost(base_url, name)
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            rabbitmqctl("delete_vhost", name)
