"""The ``waybill`` operator command line, called in-process through ``app.cli.main``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from app import cli
from app.celery_app import celery_config
from app.db import Database
from app.models import ApiKey, Organization
from app.services import organizations
from app.services.errors import ValidationFailed
from config import Settings
from tests.support import make_org

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# Variables a developer's shell or CI may export that would change what these tests see.
AMBIENT = (
    "DATABASE_URL",
    "VAR_DIR",
    "REDIS_URL",
    "BROKER_URL",
    "FLOWER_BASIC_AUTH",
    "FLOWER_UNAUTHENTICATED_API",
    "CONSOLE_BASIC_AUTH",
    "CONSOLE_ENABLED",
    "FAULT_CRASH_AFTER_COMMIT",
    "FAULT_INJECTION",
    cli.LOCAL_RUN_ENV,
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in AMBIENT:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def cli_env(clean_env: pytest.MonkeyPatch, settings: Settings, db: Database) -> Database:
    """The CLI reads the environment: point it at the test database (Redis: a closed port)."""
    clean_env.setenv("DATABASE_URL", settings.database_url)
    clean_env.setenv("VAR_DIR", settings.var_dir)
    clean_env.setenv("REDIS_URL", settings.redis_url)
    return db


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def limits_of(db: Database, org_id: str) -> tuple[int, int]:
    with db.session() as s:
        org = s.get(Organization, org_id)
        assert org is not None
        return org.queue_limit, org.concurrency_limit


# 1. org limits: bounds


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--queue-limit", "-1"], "queueLimit"),
        (["--concurrency-limit", "0"], "concurrencyLimit"),
        # A valid value beside an invalid one is not applied either.
        (["--queue-limit", "5", "--concurrency-limit", "-3"], "concurrencyLimit"),
    ],
)
def test_org_limits_out_of_bounds_exit_2_and_change_nothing(
    cli_env: Database, capsys: pytest.CaptureFixture[str], flags: list[str], field: str
) -> None:
    org = make_org(cli_env, queue_limit=100, concurrency_limit=4)
    code, out, err = run(capsys, "org", "limits", org.id, *flags)
    assert code == 2
    assert out == ""
    assert field in err
    assert limits_of(cli_env, org.id) == (100, 4)


def test_set_limits_service_checks_the_bounds(db: Database) -> None:
    org = make_org(db, queue_limit=100, concurrency_limit=4)
    with pytest.raises(ValidationFailed) as raised, db.session() as s:
        organizations.set_limits(s, org.id, queue_limit=-1, concurrency_limit=0)
    assert set(raised.value.errors) == {"queueLimit", "concurrencyLimit"}
    # The lowest valid values are accepted.
    with db.session() as s:
        organizations.set_limits(s, org.id, queue_limit=0, concurrency_limit=1)
    assert limits_of(db, org.id) == (0, 1)


# 2. org create: keyId


def test_org_create_prints_the_key_id(cli_env: Database, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "org", "create", "acme", "--credits", "10")
    assert code == 0
    created = json.loads(out)
    assert list(created) == ["organizationId", "apiKey", "keyId", "webhookSecret"]
    with cli_env.session() as s:
        key = s.get(ApiKey, created["keyId"])
        assert key is not None
        assert key.organization_id == created["organizationId"]
        assert organizations.authenticate(s, created["apiKey"]) == created["organizationId"]


# 3. key list


def test_key_list_shows_prefixes_and_times(cli_env: Database, capsys: pytest.CaptureFixture[str]) -> None:
    org = make_org(cli_env)
    code, out, _ = run(capsys, "key", "create", org.id)
    assert code == 0
    second = json.loads(out)
    with cli_env.session() as s:
        first_id = s.execute(
            select(ApiKey.id).where(ApiKey.organization_id == org.id, ApiKey.id != second["keyId"])
        ).scalar_one()
        organizations.revoke_api_key(s, first_id)

    code, out, _ = run(capsys, "key", "list", org.id)
    assert code == 0
    keys = json.loads(out)
    assert [k["keyId"] for k in keys] == [first_id, second["keyId"]]
    for k in keys:
        assert list(k) == ["keyId", "prefix", "createdAt", "revokedAt"]
        assert RFC3339.match(k["createdAt"])
    assert org.api_key.startswith(keys[0]["prefix"] + "_")
    assert second["apiKey"].startswith(keys[1]["prefix"] + "_")
    assert RFC3339.match(keys[0]["revokedAt"])
    assert keys[1]["revokedAt"] is None
    # Prefixes only: no key is ever printed again.
    assert org.api_key not in out and second["apiKey"] not in out


def test_key_list_of_an_unknown_organization_fails(
    cli_env: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "key", "list", "org_nope")
    assert (code, out) == (1, "")
    assert "org_nope" in err


# 4. key revoke by id or by key


def test_key_revoke_accepts_the_key_itself_or_its_id(
    cli_env: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    org = make_org(cli_env)
    code, out, _ = run(capsys, "key", "revoke", org.api_key)
    assert code == 0
    revoked = json.loads(out)
    assert revoked["keyId"].startswith("key_")
    assert revoked["revoked"] is True
    assert org.api_key not in out
    with cli_env.session() as s:
        assert organizations.authenticate(s, org.api_key) is None
        key = s.get(ApiKey, revoked["keyId"])
        assert key is not None and key.organization_id == org.id and key.revoked_at is not None

    # By its id, as before.
    other = make_org(cli_env, "other")
    with cli_env.session() as s:
        key_id = s.execute(select(ApiKey.id).where(ApiKey.organization_id == other.id)).scalar_one()
    code, out, _ = run(capsys, "key", "revoke", key_id)
    assert code == 0
    assert json.loads(out)["keyId"] == key_id
    with cli_env.session() as s:
        assert organizations.authenticate(s, other.api_key) is None


def test_key_revoke_of_an_unknown_or_wrong_key_fails_without_echoing_it(
    cli_env: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    org = make_org(cli_env)
    # Right prefix, wrong secret: found by prefix, refused by hash.
    wrong = org.api_key[:-4] + ("AAAA" if not org.api_key.endswith("AAAA") else "BBBB")
    for candidate in (wrong, "wb_000000000000_unknown", "key_nope"):
        code, out, err = run(capsys, "key", "revoke", candidate)
        assert (code, out) == (1, ""), candidate
        assert err.startswith("waybill: no API key")
        if candidate.startswith("wb_"):
            assert candidate not in err
    with cli_env.session() as s:
        assert organizations.authenticate(s, org.api_key) == org.id


# 5. outside the project folder; operational errors in one line


@pytest.mark.parametrize(
    "argv",
    [
        ["org", "create", "acme"],
        ["org", "credit", "org_x", "5"],
        ["org", "limits", "org_x", "--queue-limit", "5"],
        ["key", "create", "org_x"],
        ["key", "list", "org_x"],
        ["key", "revoke", "key_x"],
    ],
)
def test_outside_the_project_folder_nothing_is_created(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    clean_env.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1
    assert "no Waybill database" in err
    assert "waybill db upgrade" in err and "DATABASE_URL" in err and "VAR_DIR" in err
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_database_is_one_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DATABASE_URL", f"postgresql+psycopg://waybill:hunter2@127.0.0.1:{free_port()}/waybill")
    code, out, err = run(capsys, "org", "credit", "org_x", "5")
    assert (code, out) == (1, "")
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("waybill: database postgresql+psycopg://waybill:***@127.0.0.1")
    assert "hunter2" not in err


def test_an_unmigrated_database_says_to_migrate(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.sqlite3"
    path.touch()
    clean_env.setenv("DATABASE_URL", f"sqlite:///{path}")
    code, _, err = run(capsys, "key", "list", "org_x")
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "no such table" in err and "waybill db upgrade" in err


# 6. Celery without a broker


def test_the_celery_app_needs_a_redis_url(tmp_path: Path) -> None:
    settings = Settings.from_env({}, var_dir=str(tmp_path / "var"))
    with pytest.raises(RuntimeError, match="REDIS_URL"):
        celery_config(settings)


def test_celery_outside_a_run_names_redis_url(tmp_path: Path) -> None:
    # `celery report` loads the app like worker, beat and flower, but never
    # connects to the broker, so it cannot hang here.
    env = {k: v for k, v in os.environ.items() if k not in AMBIENT}
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.main", "report"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "REDIS_URL is not set" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "127.0.0.1:1" not in proc.stdout + proc.stderr
    assert not (tmp_path / "var").exists()


# 7. ports of the local run


def test_a_taken_http_port_is_named(settings: Settings, occupied_port: int) -> None:
    problem = cli.port_problem(settings.with_overrides(http_port=occupied_port, flower_port=free_port()))
    assert problem is not None
    assert f"HTTP_PORT {occupied_port}" in problem
    assert f"HTTP_PORT={occupied_port + 1} make run" in problem


def test_a_taken_flower_port_is_named(settings: Settings, occupied_port: int) -> None:
    problem = cli.port_problem(settings.with_overrides(http_port=free_port(), flower_port=occupied_port))
    assert problem is not None
    assert f"FLOWER_PORT {occupied_port}" in problem
    assert f"FLOWER_PORT={occupied_port + 1} make run" in problem


def test_free_ports_pass_and_equal_ports_do_not(settings: Settings) -> None:
    port = free_port()
    assert cli.port_problem(settings.with_overrides(http_port=port, flower_port=free_port())) is None
    problem = cli.port_problem(settings.with_overrides(http_port=port, flower_port=port))
    assert problem is not None and "HTTP_PORT and FLOWER_PORT" in problem


# 8. Flower


def test_flower_password_goes_through_the_environment(settings: Settings) -> None:
    argv, env = cli.flower_command(settings.with_overrides(flower_basic_auth="admin:s3cret-pw"), {})
    assert not any("s3cret-pw" in arg or "basic_auth" in arg for arg in argv)
    assert env["FLOWER_BASIC_AUTH"] == "admin:s3cret-pw"
    assert "FLOWER_UNAUTHENTICATED_API" not in env


def test_flower_always_needs_a_password_and_drops_an_inherited_open_api(settings: Settings) -> None:
    # Not even the local run goes without: `waybill run` generates one (below).
    for environ in ({}, {cli.LOCAL_RUN_ENV: "1"}, {"FLOWER_UNAUTHENTICATED_API": "true"}):
        with pytest.raises(cli.CliError, match="FLOWER_BASIC_AUTH") as refused:
            cli.flower_command(settings, environ)
        assert refused.value.status == 2
    argv, env = cli.flower_command(
        settings.with_overrides(flower_basic_auth="operator:generated-pw", http_host="127.0.0.1"),
        {cli.LOCAL_RUN_ENV: "1", "FLOWER_UNAUTHENTICATED_API": "true"},
    )
    assert env["FLOWER_BASIC_AUTH"] == "operator:generated-pw"
    assert "FLOWER_UNAUTHENTICATED_API" not in env  # its API takes the password instead
    assert "--address=127.0.0.1" in argv and not any("generated-pw" in arg for arg in argv)


# 8b. the local run's operator credentials


def test_the_local_run_generates_console_and_flower_credentials_only_when_unset() -> None:
    env: dict[str, str] = {}
    generated = cli.local_run_credentials(env)
    assert set(generated) == {"CONSOLE_BASIC_AUTH", "FLOWER_BASIC_AUTH"}
    for name, value in generated.items():
        assert env[name] == value
        user, _, password = value.partition(":")
        assert user == "operator" and len(password) >= 20 and "," not in password  # Flower splits on commas
    assert generated["CONSOLE_BASIC_AUTH"] != generated["FLOWER_BASIC_AUTH"]
    assert cli.local_run_credentials({}) != generated  # new ones each run
    # An operator's own are kept and not reported as generated.
    env = {"CONSOLE_BASIC_AUTH": "me:mine", "FLOWER_BASIC_AUTH": ""}
    generated = cli.local_run_credentials(env)
    assert env["CONSOLE_BASIC_AUTH"] == "me:mine" and list(generated) == ["FLOWER_BASIC_AUTH"]


class FakeHoncho:
    """Stands in for honcho: records its environment and ends at once."""

    started: list[dict[str, str]] = []

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        FakeHoncho.started.append(env)

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def poll(self) -> int:
        return 0


def test_waybill_run_hands_the_credentials_to_the_processes_and_prints_them(
    cli_env: Database, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    clean_env.setenv("HTTP_PORT", str(free_port()))
    clean_env.setenv("FLOWER_PORT", str(free_port()))
    clean_env.setattr(cli.subprocess, "Popen", FakeHoncho)
    clean_env.setattr(cli.signal, "signal", lambda *a: None)  # keep pytest's own handlers
    FakeHoncho.started.clear()
    procfile = tmp_path / "Procfile"
    procfile.write_text("web: true\n")

    assert cli.main(["run", "--procfile", str(procfile)]) == 0
    out, _ = capsys.readouterr()
    [env] = FakeHoncho.started
    assert env[cli.LOCAL_RUN_ENV] == "1"
    console, flower = env["CONSOLE_BASIC_AUTH"], env["FLOWER_BASIC_AUTH"]
    assert console.startswith("operator:") and flower.startswith("operator:")
    console_line = next(line for line in out.splitlines() if line.startswith("Console "))
    flower_line = next(line for line in out.splitlines() if line.startswith("Flower "))
    assert "/console/" in console_line and console in console_line
    assert flower in flower_line
    # Those the operator set are used as they are, and not printed.
    FakeHoncho.started.clear()
    clean_env.setenv("CONSOLE_BASIC_AUTH", "me:my-own-password")
    clean_env.setenv("FLOWER_BASIC_AUTH", "me:my-flower-password")
    assert cli.main(["run", "--procfile", str(procfile)]) == 0
    out, _ = capsys.readouterr()
    [env] = FakeHoncho.started
    assert env["CONSOLE_BASIC_AUTH"] == "me:my-own-password"
    assert "my-own-password" not in out and "my-flower-password" not in out
    assert "as set in CONSOLE_BASIC_AUTH" in out and "as set in FLOWER_BASIC_AUTH" in out


# 9. fault injection is gated


def test_fault_crash_after_commit_needs_fault_injection() -> None:
    with pytest.raises(ValueError, match="FAULT_INJECTION=1"):
        Settings.from_env({"FAULT_CRASH_AFTER_COMMIT": "0.02"})
    with pytest.raises(ValueError, match="FAULT_CRASH_AFTER_COMMIT"):
        Settings.from_env({"FAULT_CRASH_AFTER_COMMIT": "2", "FAULT_INJECTION": "1"})
    chaos = Settings.from_env({"FAULT_CRASH_AFTER_COMMIT": "0.02", "FAULT_INJECTION": "1"})
    assert chaos.fault_crash_after_commit == 0.02
    assert Settings.from_env({"FAULT_CRASH_AFTER_COMMIT": "0"}).fault_crash_after_commit == 0.0


def test_the_cli_reports_a_bad_setting_in_one_line(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.chdir(tmp_path)
    clean_env.setenv("FAULT_CRASH_AFTER_COMMIT", "0.5")
    code, out, err = run(capsys, "org", "create", "acme")
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1
    assert "FAULT_INJECTION" in err
