"""The ``waybill`` operator command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from app.db import Database
from app.services import organizations
from app.services.errors import ServiceError, ValidationFailed
from app.services.representation import iso
from config import Settings

LOCAL_RUN_ENV = "WAYBILL_LOCAL_RUN"
# Exit statuses: 1 the command failed (unknown id, database unreachable);
# 2 it was refused before doing anything (bad arguments or configuration).
EXIT_FAILED = 1
EXIT_REFUSED = 2
# Database connection attempts from the CLI give up after this long instead
# of the driver's default (minutes, for a host that drops packets).
PG_CONNECT_TIMEOUT_SECONDS = 10


class CliError(Exception):
    """An expected failure: one line on stderr and an exit status, no traceback."""

    def __init__(self, message: str, status: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _db(settings: Settings) -> Database:
    # From the settings, as the app's: behind PgBouncer in transaction mode
    # the CLI must not prepare statements or SET either.
    if make_url(settings.resolved_database_url()).get_backend_name() == "postgresql":
        return Database.from_settings(settings, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS})
    return Database.from_settings(settings)


def require_database(settings: Settings) -> None:
    """Refuse to go on when the SQLite database file is missing, rather than create it.

    SQLite creates a missing file on first connect (and ``make_engine`` its
    directory), so a command run outside the project folder used to leave a
    stray ``var/`` with an empty database behind, then fail with a traceback
    about a missing table. Only ``waybill run`` and ``waybill db upgrade``
    create the database.
    """
    parsed = make_url(settings.resolved_database_url())
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    if path.exists():
        return
    source = "DATABASE_URL" if settings.database_url else "DATABASE_URL is unset; the default under VAR_DIR"
    raise CliError(
        f"no Waybill database at {path} ({source}): run `make run` or `waybill db upgrade` in the "
        "project folder first, or set DATABASE_URL (or VAR_DIR) to the database to use"
    )


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def cmd_org_create(args: argparse.Namespace, settings: Settings) -> int:
    db = _db(settings)
    with db.session() as s:
        created = organizations.create_organization(
            s,
            args.name,
            credits=settings.default_credits if args.credits is None else args.credits,
            queue_limit=settings.default_queue_limit if args.queue_limit is None else args.queue_limit,
            concurrency_limit=(
                settings.default_concurrency_limit
                if args.concurrency_limit is None
                else args.concurrency_limit
            ),
        )
        out = {
            "organizationId": created.organization.id,
            "apiKey": created.key.api_key,
            "keyId": created.key.key_id,
            "webhookSecret": created.organization.webhook_secret,
        }
    _print(out)
    return 0


def cmd_org_credit(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings).session() as s:
        balance = organizations.grant_credits(s, args.org_id, args.amount)
    _print({"organizationId": args.org_id, "credits": balance})
    return 0


def cmd_org_limits(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings).session() as s:
        org = organizations.set_limits(
            s, args.org_id, queue_limit=args.queue_limit, concurrency_limit=args.concurrency_limit
        )
        if args.concurrency_limit is not None:
            _tell_dispatcher(settings, org.id, args.concurrency_limit)
        out = {
            "organizationId": org.id,
            "queueLimit": org.queue_limit,
            "concurrencyLimit": org.concurrency_limit,
        }
    _print(out)
    return 0


def _tell_dispatcher(settings: Settings, org_id: str, limit: int) -> None:
    """The dispatcher reads concurrency limits from Redis; SQL stays the record."""
    import redis

    from app import redis_conn
    from app.dispatch import Dispatcher

    try:
        client = redis_conn.connect(settings.resolved_redis_url(), socket_connect_timeout=2)
        Dispatcher(client).set_concurrency_limit(org_id, limit)
    except (RuntimeError, redis.RedisError) as exc:
        print(
            f"waybill: saved; the dispatcher picks the new limit up at the organization's next "
            f"submission (Redis not reachable now: {type(exc).__name__})",
            file=sys.stderr,
        )


def cmd_key_create(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings).session() as s:
        key = organizations.create_api_key(s, args.org_id)
    _print({"keyId": key.key_id, "apiKey": key.api_key})
    return 0


def cmd_key_list(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings).read_session() as s:
        out = [
            {
                "keyId": key.id,
                # What the key itself begins with, to match it against a key in hand.
                "prefix": f"{organizations.KEY_PREFIX}{key.prefix}",
                "createdAt": iso(key.created_at),
                "revokedAt": iso(key.revoked_at),
            }
            for key in organizations.list_api_keys(s, args.org_id)
        ]
    _print(out)
    return 0


def cmd_key_revoke(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings).session() as s:
        key = organizations.revoke_api_key(s, args.key)
        out = {"keyId": key.id, "revoked": True, "revokedAt": iso(key.revoked_at)}
    _print(out)
    return 0


_AGO = re.compile(r"([0-9]{1,7})([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_value(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an RFC 3339 time with its offset, or a duration ago (``90m``, ``2h``, ``7d``)."""
    text = text.strip()
    ago = _AGO.fullmatch(text)
    if ago is not None:
        return (now or datetime.now(UTC)) - timedelta(seconds=int(ago.group(1)) * _UNIT[ago.group(2)])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an RFC 3339 time with its offset (2026-11-30T08:00:00Z) "
            "or a duration ago (90m, 2h, 7d)"
        )
    return when


def cmd_deliveries_redeliver(args: argparse.Namespace, settings: Settings) -> int:
    """Every failed delivery of the organization since ``--since`` (to ``--host``) again, as the API does."""
    from app import create_app
    from app.usecases import redeliver

    with _db(settings).read_session() as s:
        organizations.get_organization(s, args.org_id)  # unknown: exit 1 with its message
    app = create_app(settings)
    count = redeliver.redeliver_failed(app.extensions["waybill"], args.org_id, args.since, args.host)
    _print({"organizationId": args.org_id, "count": count})
    return 0


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from app.migrate import upgrade

    upgrade(settings.resolved_database_url())
    print("database is at the latest migration", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """gunicorn, as the Procfile's ``web`` line runs it."""
    from app.console import refusal

    # Before gunicorn starts: one line here, rather than a traceback per
    # gunicorn worker, and never a console that serves without credentials.
    problem = refusal(settings, os.environ)
    if problem is not None:
        raise CliError(problem)
    # By module, with this interpreter: the venv's bin need not be on PATH.
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        "python:app.gunicorn_conf",
        "--bind",
        f"{settings.http_host}:{settings.http_port}",
        "--workers",
        str(settings.web_concurrency),
        # Ordinary requests keep web_threads whatever the streams hold: each
        # open event stream holds a thread, bounded per process (app/api/events.py).
        "--threads",
        str(settings.web_threads + max(0, settings.event_streams_per_process)),
        "app.wsgi:app",
    ]
    os.execvp(argv[0], argv)
    return 0  # pragma: no cover


def flower_command(settings: Settings, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """Flower's argv and environment; no secret is ever in the argv.

    Any user of the host can read a process's command line (``ps``), so the
    password goes in the environment: Flower reads ``FLOWER_<OPTION>``
    variables as its options (``apply_env_options`` in flower/command.py).
    Flower always has a password, the local run's included (``waybill run``
    generates one), so its HTTP API (what the dashboard's worker and task
    actions call) works with the same credentials everywhere.
    """
    if not settings.flower_basic_auth:
        raise CliError(
            "refusing to start Flower without FLOWER_BASIC_AUTH=user:password "
            "(`waybill run` generates one for the local run)"
        )
    env = dict(environ)
    env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    # An inherited "API without authentication" must not outlive the password's arrival.
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.main",
        "flower",
        f"--address={settings.http_host}",
        f"--port={settings.flower_port}",
    ]
    return argv, env


def cmd_flower(args: argparse.Namespace, settings: Settings) -> int:
    argv, env = flower_command(settings, os.environ)
    os.execvpe(argv[0], argv, env)
    return 0  # pragma: no cover


def _bind_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now, or None when it can."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As gunicorn and tornado (Flower) do: a port that the previous run
        # left in TIME_WAIT is free for them, so it is free here too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def port_problem(settings: Settings) -> str | None:
    """What stops the local run from listening on its two ports, naming the setting to change."""
    host = settings.http_host
    if settings.http_port == settings.flower_port:
        return (
            f"HTTP_PORT and FLOWER_PORT are both {settings.http_port}: choose another for one of them, "
            f"e.g. `FLOWER_PORT={settings.flower_port + 1} make run`"
        )
    for name, port in (("HTTP_PORT", settings.http_port), ("FLOWER_PORT", settings.flower_port)):
        try:
            error = _bind_error(host, port)
        except OSError as exc:  # socket.gaierror: the host does not resolve
            return f"HTTP_HOST {host!r} cannot be listened on ({exc})"
        if error is not None:
            return (
                f"{name} {port} on {host} is not available ({error}): stop what listens there, "
                f"or choose another port, e.g. `{name}={port + 1} make run`"
            )
    return None


def ensure_demo(settings: Settings) -> dict[str, str]:
    """The demo organization of the local run, created once; its key is kept in var/demo.json."""
    path = settings.var_path / "demo.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    db = _db(settings)
    with db.session() as s:
        created = organizations.create_organization(
            s,
            "demo",
            credits=settings.default_credits,
            queue_limit=settings.default_queue_limit,
            concurrency_limit=settings.default_concurrency_limit,
        )
        demo = {"organizationId": created.organization.id, "apiKey": created.key.api_key}
    db.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(demo))
    path.chmod(0o600)
    return demo


# The local run's operator credentials, generated when the environment gives none.
LOCAL_CREDENTIALS = ("CONSOLE_BASIC_AUTH", "FLOWER_BASIC_AUTH")


def local_run_credentials(env: dict[str, str]) -> dict[str, str]:
    """Set every unset operator credential of ``env`` to a new ``operator:<random>``; returns those set.

    The console and Flower never run without a password, not even locally;
    the processes of the run get these in their environment (never on a
    command line), and the banner prints them.
    """
    generated = {}
    for name in LOCAL_CREDENTIALS:
        if not env.get(name):
            env[name] = generated[name] = f"operator:{secrets.token_urlsafe(18)}"
    return generated


def banner(
    settings: Settings, env: Mapping[str, str], demo: Mapping[str, str], generated: Mapping[str, str]
) -> str:
    """What ``waybill run`` prints once everything is ready to start."""
    base = f"http://{settings.http_host}:{settings.http_port}"

    def credentials(name: str) -> str:
        # Generated ones are printed (nobody else knows them); an operator's own are not repeated.
        return generated.get(name, f"as set in {name}")

    return f"""
Waybill is starting: API {base}
Console {base}/console/   user:password {credentials("CONSOLE_BASIC_AUTH")}
Flower  http://{settings.http_host}:{settings.flower_port}/   user:password {credentials("FLOWER_BASIC_AUTH")}
Redis {env["REDIS_URL"]}   Broker {env.get("BROKER_URL") or "the same Redis"}
Database {settings.resolved_database_url()}

Demo organization {demo["organizationId"]}, API key:
  {demo["apiKey"]}

Try it (in another terminal):
  curl -s -X POST {base}/v1/tasks -H 'Authorization: Bearer {demo["apiKey"]}' \\
       -H 'Content-Type: application/json' -d '{{"type": "echo", "input": {{"hello": "world"}}}}'
  curl -s {base}/v1/tasks/TASK_ID -H 'Authorization: Bearer {demo["apiKey"]}'

Ctrl-C stops everything.
"""


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The local run: migrate, start Redis if needed, make a demo key, run the Procfile."""
    from app.embedded_redis import EmbeddedRedis
    from app.migrate import upgrade

    # Before anything starts: otherwise honcho starts every process, the one
    # whose port is taken dies, and honcho stops the rest without saying why.
    problem = port_problem(settings)
    if problem is not None:
        raise CliError(problem)
    settings.var_path.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url())
    env = dict(os.environ)
    env.setdefault("WEBHOOK_ALLOW_PRIVATE", "true")
    env.setdefault("FETCH_ALLOW_PRIVATE", "true")
    env[LOCAL_RUN_ENV] = "1"
    # Every process of the run writes its metrics here; /metrics adds them up.
    metrics_dir = settings.var_path / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    env["VAR_DIR"] = str(settings.var_path)
    redis: EmbeddedRedis | None = None
    url_file = settings.embedded_redis_url_file
    if not settings.redis_url:
        redis = EmbeddedRedis(settings.var_path / "redis").start()
        url_file.parent.mkdir(parents=True, exist_ok=True)
        url_file.write_text(redis.url)
        env["REDIS_URL"] = redis.url
    demo = ensure_demo(settings)
    generated = local_run_credentials(env)
    print(banner(settings, env, demo, generated), flush=True)
    procfile = Path(args.procfile).resolve()
    # The Procfile's commands (celery, waybill, honcho itself) live beside
    # this interpreter, which need not be on PATH (make run calls .venv/bin/waybill).
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    honcho = shutil.which("honcho", path=env["PATH"]) or "honcho"
    try:
        proc = subprocess.Popen([honcho, "-f", str(procfile), "-d", str(procfile.parent), "start"], env=env)
    except BaseException:
        if redis is not None:
            redis.stop()
            url_file.unlink(missing_ok=True)
        raise

    def forward(signum: int, _frame: Any) -> None:
        # Ctrl-C reaches the whole process group already; SIGTERM to this
        # process alone is passed on so that honcho stops every process.
        if signum == signal.SIGTERM and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        if redis is not None:
            redis.stop()
            url_file.unlink(missing_ok=True)
    return 0 if code in (0, -signal.SIGINT, -signal.SIGTERM, 130, 143) else code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="waybill", description="Operate Waybill.")
    sub = parser.add_subparsers(dest="command", required=True)

    org = sub.add_parser("org", help="organizations").add_subparsers(dest="org_command", required=True)
    p = org.add_parser("create", help="create an organization and its first API key")
    p.add_argument("name")
    p.add_argument("--credits", type=int)
    p.add_argument("--queue-limit", type=int)
    p.add_argument("--concurrency-limit", type=int)
    p.set_defaults(func=cmd_org_create, needs_database=True)
    p = org.add_parser("credit", help="add (or, negative, remove) credits")
    p.add_argument("org_id")
    p.add_argument("amount", type=int)
    p.set_defaults(func=cmd_org_credit, needs_database=True)
    p = org.add_parser("limits", help="set an organization's queue or concurrency limit")
    p.add_argument("org_id")
    p.add_argument("--queue-limit", type=int)
    p.add_argument("--concurrency-limit", type=int)
    p.set_defaults(func=cmd_org_limits, needs_database=True)

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="key_command", required=True)
    p = key.add_parser("create", help="create an API key (shown once)")
    p.add_argument("org_id")
    p.set_defaults(func=cmd_key_create, needs_database=True)
    p = key.add_parser("list", help="an organization's API keys (prefixes only), live and revoked")
    p.add_argument("org_id")
    p.set_defaults(func=cmd_key_list, needs_database=True)
    p = key.add_parser("revoke", help="revoke an API key, given its id (key_...) or the key (wb_...)")
    p.add_argument("key", metavar="KEY_ID|KEY")
    p.set_defaults(func=cmd_key_revoke, needs_database=True)

    deliveries = sub.add_parser("deliveries", help="webhook deliveries").add_subparsers(
        dest="deliveries_command", required=True
    )
    p = deliveries.add_parser(
        "redeliver", help="deliver again every failed delivery of an organization since a time"
    )
    p.add_argument("org_id")
    p.add_argument(
        "--since", type=since_value, required=True, help="RFC 3339 time, or a duration ago: 2h, 7d"
    )
    p.add_argument("--host", help="only deliveries to this host")
    p.set_defaults(func=cmd_deliveries_redeliver, needs_database=True)

    db = sub.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply the migrations").set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("run", help="the local run: every Procfile process, until Ctrl-C")
    p.add_argument("--procfile", default="Procfile")
    p.set_defaults(func=cmd_run)
    # Both build the app, whose database engine would create a missing SQLite file.
    p = sub.add_parser("serve", help="the web process (gunicorn)")
    p.set_defaults(func=cmd_serve, needs_database=True)
    p = sub.add_parser("flower", help="the Flower dashboard")
    p.set_defaults(func=cmd_flower, needs_database=True)
    return parser


def _fail(message: str, status: int) -> int:
    print(f"waybill: {message}", file=sys.stderr)
    return status


def _database_error(exc: sa_exc.DBAPIError, settings: Settings) -> str:
    url = make_url(settings.resolved_database_url()).render_as_string(hide_password=True)
    lines = str(exc.orig).strip().splitlines() if exc.orig is not None else []
    reason = lines[0] if lines else type(exc).__name__
    if "no such table" in reason or ("relation" in reason and "does not exist" in reason):
        reason += " (run `waybill db upgrade`)"
    return f"database {url}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        return _fail(f"configuration: {exc}", EXIT_REFUSED)
    try:
        if getattr(args, "needs_database", False):
            require_database(settings)
        return int(args.func(args, settings))
    except CliError as exc:
        return _fail(exc.message, exc.status)
    except ValidationFailed as exc:
        for field, messages in exc.errors.items():
            print(f"waybill: {field}: {'; '.join(messages)}", file=sys.stderr)
        return EXIT_REFUSED
    except ServiceError as exc:
        return _fail(exc.detail, EXIT_FAILED)
    except sa_exc.ArgumentError as exc:
        return _fail(f"DATABASE_URL is not a usable database URL: {exc}", EXIT_REFUSED)
    except sa_exc.DBAPIError as exc:
        # Integrity and data errors are bugs, not the environment: keep their traceback.
        if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
            raise
        return _fail(_database_error(exc, settings), EXIT_FAILED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
