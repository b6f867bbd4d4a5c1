"""The `boxoffice` command line: settings that cannot be used, --version and --help, and the
summary of `migrate`, run as real subprocesses."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from importlib.metadata import version

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from service.core.settings import SettingError, Settings
from tests.apiserver import BOXOFFICE
from tests.conftest import _test_settings, server_env
from tests.servers import free_port


def boxoffice(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The test database and Redis unless overridden: a command that wrongly went ahead
    # would touch only the test's data.
    return subprocess.run(
        [BOXOFFICE, *args],
        env={**os.environ, **server_env(_test_settings()), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_refused(result: subprocess.CompletedProcess[str], variable: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


BAD_SETTINGS = [
    ("BOXOFFICE_REDIS_URL", "notaurl"),
    ("BOXOFFICE_REDIS_URL", "redis://127.0.0.1:abc/0"),
    ("BOXOFFICE_DATABASE_URL", "garbage"),
    ("BOXOFFICE_DATABASE_URL", "mysql://127.0.0.1/boxoffice"),
    ("BOXOFFICE_DATABASE_URL", "postgresql+psycopg://127.0.0.1/boxoffice"),
    ("BOXOFFICE_DATABASE_URL", "postgresql://127.0.0.1:5432"),
    ("BOXOFFICE_PORT", "abc"),
    ("BOXOFFICE_PORT", "70000"),
    ("BOXOFFICE_WORKERS", "0"),
    ("BOXOFFICE_SWEEP_INTERVAL_SECONDS", "soon"),
    ("BOXOFFICE_OUTBOX_BATCH", "-5"),
    ("BOXOFFICE_HTTP_MAX_CONNECTIONS", "lots"),
    ("BOXOFFICE_HTTP_IDLE_TIMEOUT_SECONDS", "0"),
    ("BOXOFFICE_REDIS_SEED_NODES", "127.0.0.1:7000,nohost"),
    ("BOXOFFICE_REDIS_CLUSTER_RETRY_SECONDS", "0"),
    ("BOXOFFICE_REDIS_TIMEOUT_SECONDS", "0"),
    ("BOXOFFICE_REDIS_TIMEOUT_SECONDS", "61"),
    ("BOXOFFICE_REDIS_TIMEOUT_SECONDS", "soon"),
    ("BOXOFFICE_CPU_SLICE_US", "50"),  # below the kernel's shortest, which would round it up
    ("BOXOFFICE_CPU_SLICE_US", "100001"),
    ("BOXOFFICE_CPU_SLICE_US", "-1"),
    ("BOXOFFICE_CPU_SLICE_US", "short"),
    ("BOXOFFICE_CPU_POLICY", "fifo"),  # real-time policies are not the API's to take
]


@pytest.mark.parametrize(("variable", "value"), BAD_SETTINGS)
def test_a_setting_that_cannot_be_used_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")


# Each command, each kind of setting: every command goes through the same validation.
@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("serve", "BOXOFFICE_PORT", "abc"),
        ("serve", "BOXOFFICE_DATABASE_URL", "garbage"),
        ("worker", "BOXOFFICE_REDIS_URL", "notaurl"),
        ("worker", "BOXOFFICE_OUTBOX_BATCH", "many"),
        ("migrate", "BOXOFFICE_DATABASE_URL", "mysql://127.0.0.1/boxoffice"),
        ("migrate", "BOXOFFICE_PORT", "abc"),
        ("reconcile", "BOXOFFICE_REDIS_URL", "notaurl"),
        ("reconcile", "BOXOFFICE_DATABASE_URL", "garbage"),
    ],
)
def test_every_command_refuses_an_unusable_setting_with_one_line(
    command: str, variable: str, value: str
) -> None:
    assert_refused(boxoffice(command, env={variable: value}), variable)


def test_serve_refuses_a_host_that_is_not_an_ip_address() -> None:
    result = boxoffice("serve", env={"BOXOFFICE_HOST": "localhost", "BOXOFFICE_PORT": "1"})
    assert_refused(result, "BOXOFFICE_HOST")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+asyncpg"])
def test_postgresql_and_postgres_urls_mean_the_asyncpg_database(scheme: str) -> None:
    settings = Settings.from_env({"BOXOFFICE_DATABASE_URL": f"{scheme}://u:p%40ss@db:5433/bo"})
    assert settings.database_url == "postgresql+asyncpg://u:p%40ss@db:5433/bo"
    # However Settings is built.
    assert Settings(database_url=f"{scheme}://db/bo").database_url == "postgresql+asyncpg://db/bo"


def test_migrate_with_a_plain_postgresql_url(settings: Settings) -> None:
    url = make_url(settings.database_url).set(drivername="postgresql")
    result = boxoffice(
        "migrate", env={"BOXOFFICE_DATABASE_URL": url.render_as_string(hide_password=False)}
    )
    assert result.returncode == 0, result.stderr
    assert f"database {url.database} is at revision" in result.stdout


def test_migrate_against_a_closed_port_names_the_server(settings: Settings) -> None:
    url = make_url(settings.database_url).set(port=free_port())
    env = {"BOXOFFICE_DATABASE_URL": url.render_as_string(hide_password=False)}
    result = boxoffice("migrate", env=env)
    assert_refused(result, "BOXOFFICE_DATABASE_URL")
    assert f"PostgreSQL at 127.0.0.1:{url.port}" in result.stderr


def test_reconcile_against_a_closed_redis_port_names_the_server() -> None:
    port = free_port()
    result = boxoffice("reconcile", env={"BOXOFFICE_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert_refused(result, "BOXOFFICE_REDIS_URL")
    assert f"Redis at 127.0.0.1:{port}" in result.stderr


def test_version() -> None:
    result = boxoffice("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"boxoffice {version('boxoffice')}"


@pytest.mark.parametrize("command", [[], ["serve"], ["worker"], ["migrate"], ["reconcile"]])
def test_help_on_every_command(command: list[str]) -> None:
    result = boxoffice(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: boxoffice {' '.join(command)}".rstrip())


def test_reconcile_help_explains_its_exit_codes() -> None:
    out = boxoffice("reconcile", "--help").stdout
    assert "exit status" in out
    for code, meaning in (("0", "agree"), ("1", "drift"), ("2", "could not run")):
        assert any(line.split()[:1] == [code] and meaning in line for line in out.splitlines()), out


async def _drop_database(url: str, name: str) -> None:
    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database="postgres"
    )
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def test_migrate_says_which_revision_and_whether_it_changed(settings: Settings) -> None:
    # A database of its own, created by migrate, so that the first run has work to do.
    url = make_url(settings.database_url)
    name = f"{url.database}_mig_{uuid.uuid4().hex[:8]}"
    env = {"BOXOFFICE_DATABASE_URL": url.set(database=name).render_as_string(hide_password=False)}
    try:
        first = boxoffice("migrate", env=env)
        assert first.returncode == 0, first.stderr
        assert "INFO" not in first.stderr and "INFO" not in first.stdout
        [line] = first.stdout.splitlines()
        assert line.startswith(f"database {name} migrated from no revision to ")
        assert line.endswith("(the latest)")
        head = line.split(" to ")[1].split()[0]

        second = boxoffice("migrate", env=env)
        assert second.returncode == 0, second.stderr
        assert "INFO" not in second.stderr
        assert second.stdout.splitlines() == [
            f"database {name} is at revision {head} (the latest); nothing to do"
        ]
    finally:
        asyncio.run(_drop_database(settings.database_url, name))
