"""Server URLs the drivers would choke on: one line naming the variable and exit 2, never
a traceback or a crash loop. Real subprocesses, as in test_cli."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from service.core.settings import SettingError, Settings
from tests.servers import free_port
from tests.test_cli import assert_refused, boxoffice


@pytest.mark.parametrize("mode", ["disable", "prefer"])
def test_migrate_with_libpq_sslmode_in_the_database_url(settings: Settings, mode: str) -> None:
    """`?sslmode=` (libpq's) used to reach asyncpg's connect() as an unknown argument."""
    url = make_url(settings.database_url).set(drivername="postgres", query={"sslmode": mode})
    result = boxoffice(
        "migrate", env={"BOXOFFICE_DATABASE_URL": url.render_as_string(hide_password=False)}
    )
    assert result.returncode == 0, result.stderr
    assert f"database {url.database} is at revision" in result.stdout


def test_sslmode_becomes_asyncpgs_ssl() -> None:
    settings = Settings.from_env({"BOXOFFICE_DATABASE_URL": "postgres://db/bo?sslmode=require"})
    assert settings.database_url == "postgresql+asyncpg://db/bo?ssl=require"


@pytest.mark.parametrize(
    "query", ["application_name=x", "sslmode=sometimes", "sslmode=require&ssl=disable"]
)
def test_a_database_url_parameter_that_cannot_be_used_is_refused(query: str) -> None:
    with pytest.raises(SettingError) as caught:
        Settings.from_env({"BOXOFFICE_DATABASE_URL": f"postgres://db/bo?{query}"})
    assert caught.value.variable == "BOXOFFICE_DATABASE_URL"
    result = boxoffice("migrate", env={"BOXOFFICE_DATABASE_URL": f"postgres://db/bo?{query}"})
    assert_refused(result, "BOXOFFICE_DATABASE_URL")


@pytest.mark.parametrize(
    "command",
    [["serve"], ["worker"], ["reconcile"], ["dead-letters"]],
    ids=lambda c: c[0],
)
def test_a_redis_database_number_redis_does_not_have_is_one_line(
    settings: Settings, command: list[str]
) -> None:
    """Redis answers SELECT 99 with "ERR DB index is out of range": it used to be a
    traceback (reconcile, dead-letters), a crash loop (serve) or a traceback loop (worker)."""
    url = settings.redis_url.rsplit("/", 1)[0] + "/99"
    env = {"BOXOFFICE_REDIS_URL": url, "BOXOFFICE_PORT": str(free_port())}
    result = boxoffice(*command, env=env)
    assert_refused(result, "BOXOFFICE_REDIS_URL")
    assert "out of range" in result.stderr
