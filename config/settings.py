from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class Settings:
    """One immutable object with every setting; see ``docs/configuration.rst``.

    ``from_env`` maps ``FIELD_NAME`` environment variables onto the fields
    (``database_url`` <- ``DATABASE_URL``) and converts them to the field's type.
    """

    var_dir: str = "./var"
    database_url: str = ""  # empty: an SQLite file under var_dir
    redis_url: str = ""  # empty: the embedded server's URL written under var_dir
    # The Celery broker: redis://... (and the Sentinel form) or amqp://...
    # (RabbitMQ, quorum queues). Empty: REDIS_URL. Dispatch state, counters
    # and the limiter stay on REDIS_URL whichever broker carries the messages.
    broker_url: str = ""
    # SQLAlchemy's pool per process (web process, Celery worker process):
    # at most pool_size + max_overflow connections each (docs/scaling.rst).
    # 16 in all: a web process's 16 threads each hold one at a time.
    database_pool_size: int = 5
    database_max_overflow: int = 11
    # Set when DATABASE_URL points at PgBouncer in transaction pooling mode:
    # no server-side prepared statements and no session state (docs/scaling.rst).
    database_transaction_pooling: bool = False
    webhook_retry_base_seconds: float = 120.0
    webhook_timeout_seconds: float = 10.0
    # Threads per tasks-worker process that send a finished task's first
    # webhook attempt themselves (0: every attempt goes through the webhooks
    # queue); when all are busy the attempt goes through the queue.
    webhook_first_attempt_threads: int = 4
    webhook_allow_private: bool = False
    # Isolation between organizations and hosts (docs/webhooks.rst): attempts
    # in flight at once, fleet-wide, per organization and per receiving host
    # (host:port); 0: no bound. About half the webhook-sending slots, so that
    # one organization or host whose receiver hangs leaves the rest to others.
    webhook_max_per_organization: int = 2
    webhook_max_per_host: int = 3
    # A host's circuit opens after this many consecutive connection failures
    # or timeouts (0: no circuits); its deliveries then wait, and one probe
    # tests it after the cool-down, doubling after each failed probe up to the max.
    webhook_circuit_failures: int = 5
    webhook_circuit_cooldown_seconds: float = 30.0
    webhook_circuit_max_seconds: float = 300.0
    fetch_allow_private: bool = False
    default_queue_limit: int = 100_000
    default_concurrency_limit: int = 10
    default_credits: int = 1000
    max_body_bytes: int = 1_048_576
    # A running task holds a lease that its worker renews; an expired lease
    # means the worker died and the task may run again.
    task_lease_seconds: float = 60.0
    task_max_attempts: int = 3
    # A finished task (its result, deliveries and attempts) is kept this long.
    result_retention_days: float = 30.0
    # Beat runs the sweep this often. A task queued but never published, or a
    # webhook attempt whose message is this late, is published again.
    sweep_interval_seconds: float = 5.0
    sweep_grace_seconds: float = 10.0
    # Fair dispatch: Celery `tasks` messages kept ready for the workers (about
    # 2x the worker slots), how long a released task may wait for a worker
    # before it is released again, and how often beat runs a dispatch step.
    dispatch_queue_target: int = 8
    dispatch_release_lease_seconds: float = 300.0
    dispatch_interval_seconds: float = 1.0
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    flower_port: int = 5555
    web_concurrency: int = 4
    web_threads: int = 16
    # Requests per web process that may hold for `Prefer: wait` at once; the
    # rest answer at once. Keep it below web_threads.
    wait_max_concurrent: int = 8
    # Event streams (GET /v1/tasks/{id}/events) a web process serves at once,
    # each on a thread of its own that `waybill serve` adds to web_threads;
    # past it a stream answers 503 (docs/performance.rst). 0: streams off.
    event_streams_per_process: int = 200
    # "user:password"; Flower refuses to start without it outside the local run.
    flower_basic_auth: str = ""
    # "user:password" for the operator console (/console/); `waybill serve`
    # refuses to start without it outside the local run, which generates one.
    console_basic_auth: str = ""
    # false: the web process serves no console at all (/console/ is 404), for
    # nodes that serve only the API; it then needs no CONSOLE_BASIC_AUTH.
    console_enabled: bool = True
    log_level: str = "INFO"
    # Celery task events from the workers, for Flower (docs/operations.rst).
    task_events: bool = True
    # Failed authentications allowed per client address per minute; past it
    # every /v1 call from that address answers 429 until the minute ends.
    auth_failures_per_minute: int = 30
    # How many reverse proxies in front of the web processes append to
    # X-Forwarded-For; the client address (for the limiter above and the
    # logs) is then the one that many hops from the right. 0: the peer address.
    trusted_proxy_hops: int = 0
    # Bearer token that /metrics requires when set (docs/operations.rst).
    metrics_token: str = ""
    # Fault injection for the chaos suite only (tests/chaos): the web process
    # dies right after committing a task, before handing it to dispatch, with
    # this probability. Never set it in production: refused unless
    # fault_injection is set too, so one stray variable cannot do it.
    fault_crash_after_commit: float = 0.0
    fault_injection: bool = False

    def __post_init__(self) -> None:
        self._check_fault_injection()

    def _check_fault_injection(self) -> None:
        p = self.fault_crash_after_commit
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"FAULT_CRASH_AFTER_COMMIT: a probability from 0 to 1, not {p}")
        if p and not self.fault_injection:
            raise ValueError(
                f"FAULT_CRASH_AFTER_COMMIT={p} makes the web process exit on purpose after commits; "
                "it is for the chaos suite only and needs FAULT_INJECTION=1 as well. "
                "Unset FAULT_CRASH_AFTER_COMMIT outside tests."
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None:
                continue
            default = getattr(cls, f.name)
            try:
                if isinstance(default, bool):
                    values[f.name] = _bool(raw)
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, float):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise ValueError(f"{f.name.upper()}: {exc}") from None
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **overrides)

    @property
    def var_path(self) -> Path:
        return Path(self.var_dir).resolve()

    @property
    def embedded_redis_url_file(self) -> Path:
        return self.var_path / "redis" / "url"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.var_path / 'waybill.sqlite3'}"

    def resolved_broker_url(self) -> str:
        """The Celery broker's URL: ``BROKER_URL``, else the Redis of :meth:`resolved_redis_url`."""
        return self.broker_url or self.resolved_redis_url()

    def resolved_redis_url(self) -> str:
        """The broker URL: ``REDIS_URL``, else the one the local run wrote.

        The local run (``waybill run``) starts an embedded Redis and writes its
        URL to ``var/redis/url`` so that every process and CLI call of that run
        finds it without the operator exporting anything.
        """
        if self.redis_url:
            return self.redis_url
        path = self.embedded_redis_url_file
        if path.exists():
            return path.read_text().strip()
        raise RuntimeError(
            "REDIS_URL is not set and no embedded Redis is running: "
            "start Waybill with `make run`, or set REDIS_URL"
        )
