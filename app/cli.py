"""The ``waybill`` operator command line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.db import Database
from app.services import organizations
from app.services.errors import ServiceError
from config import Settings

LOCAL_RUN_ENV = "WAYBILL_LOCAL_RUN"


def _db(settings: Settings) -> Database:
    return Database(settings.resolved_database_url())


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

    from app.services.dispatch import Dispatcher

    try:
        client = redis.Redis.from_url(settings.resolved_redis_url(), socket_connect_timeout=2)
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


def cmd_key_revoke(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings).session() as s:
        organizations.revoke_api_key(s, args.key_id)
    _print({"keyId": args.key_id, "revoked": True})
    return 0


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from app.migrate import upgrade

    upgrade(settings.resolved_database_url())
    print("database is at the latest migration", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """gunicorn, as the Procfile's ``web`` line runs it."""
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
        "--threads",
        str(settings.web_threads),
        "app.wsgi:app",
    ]
    os.execvp(argv[0], argv)
    return 0  # pragma: no cover


def cmd_flower(args: argparse.Namespace, settings: Settings) -> int:
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
    if settings.flower_basic_auth:
        argv.append(f"--basic_auth={settings.flower_basic_auth}")
    elif os.environ.get(LOCAL_RUN_ENV) != "1":
        print(
            "refusing to start Flower without FLOWER_BASIC_AUTH=user:password "
            "(only the local run, on 127.0.0.1, may go without)",
            file=sys.stderr,
        )
        return 2
    os.execvp(argv[0], argv)
    return 0  # pragma: no cover


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


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The local run: migrate, start Redis if needed, make a demo key, run the Procfile."""
    from app.embedded_redis import EmbeddedRedis
    from app.migrate import upgrade

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
    base = f"http://{settings.http_host}:{settings.http_port}"
    print(
        f"""
Waybill is starting: API {base}  Flower http://{settings.http_host}:{settings.flower_port}
Broker {env["REDIS_URL"]}   Database {settings.resolved_database_url()}

Demo organization {demo["organizationId"]}, API key:
  {demo["apiKey"]}

Try it (in another terminal):
  curl -s -X POST {base}/v1/tasks -H 'Authorization: Bearer {demo["apiKey"]}' \\
       -H 'Content-Type: application/json' -d '{{"type": "echo", "input": {{"hello": "world"}}}}'
  curl -s {base}/v1/tasks/TASK_ID -H 'Authorization: Bearer {demo["apiKey"]}'

Ctrl-C stops everything.
""",
        flush=True,
    )
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
    p.set_defaults(func=cmd_org_create)
    p = org.add_parser("credit", help="add (or, negative, remove) credits")
    p.add_argument("org_id")
    p.add_argument("amount", type=int)
    p.set_defaults(func=cmd_org_credit)
    p = org.add_parser("limits", help="set an organization's queue or concurrency limit")
    p.add_argument("org_id")
    p.add_argument("--queue-limit", type=int)
    p.add_argument("--concurrency-limit", type=int)
    p.set_defaults(func=cmd_org_limits)

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="key_command", required=True)
    p = key.add_parser("create", help="create an API key (shown once)")
    p.add_argument("org_id")
    p.set_defaults(func=cmd_key_create)
    p = key.add_parser("revoke", help="revoke an API key")
    p.add_argument("key_id")
    p.set_defaults(func=cmd_key_revoke)

    db = sub.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply the migrations").set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("run", help="the local run: every Procfile process, until Ctrl-C")
    p.add_argument("--procfile", default="Procfile")
    p.set_defaults(func=cmd_run)
    sub.add_parser("serve", help="the web process (gunicorn)").set_defaults(func=cmd_serve)
    sub.add_parser("flower", help="the Flower dashboard").set_defaults(func=cmd_flower)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    try:
        return int(args.func(args, settings))
    except ServiceError as exc:
        print(f"waybill: {exc.detail}", file=sys.stderr)
        for field, messages in exc.extra.get("errors", {}).items():
            print(f"  {field}: {'; '.join(messages)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
