"""Schema migrations with alembic, driven from code (no alembic.ini), and database creation."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from service.core import packagedata

MIGRATIONS = packagedata.directory("migrations")


def _config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str) -> None:
    """Run `alembic upgrade head`. Blocking: from async code use asyncio.to_thread."""
    command.upgrade(_config(database_url), "head")


def head_revision() -> str | None:
    """The revision the migrations lead to."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(database_url: str) -> str | None:
    """The revision the database is at; None before the first migration."""
    return asyncio.run(_current_revision(database_url))


async def _current_revision(database_url: str) -> str | None:
    engine = create_async_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()


def ensure_database(database_url: str) -> str:
    """Create the database named in the URL if the server does not have it yet; its name."""
    return asyncio.run(_ensure_database(database_url))


async def _ensure_database(database_url: str) -> str:
    url = make_url(database_url)
    name = url.database
    if not name:
        raise ValueError(f"no database name in {url!r}")
    # CREATE DATABASE cannot run in a transaction, nor from inside the database it creates.
    engine = create_async_engine(
        url.set(drivername="postgresql+asyncpg", database="postgres"),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
    )
    try:
        async with engine.connect() as conn:
            exists = await conn.scalar(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if not exists:
                quoted = conn.dialect.identifier_preparer.quote(name)
                await conn.execute(sa.text(f"CREATE DATABASE {quoted}"))
    finally:
        await engine.dispose()
    return name
