"""Schema migrations with alembic, driven from code (no alembic.ini), and database creation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def upgrade(database_url: str) -> None:
    """Run `alembic upgrade head`. Blocking: from async code use asyncio.to_thread."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    command.upgrade(config, "head")


def ensure_database(database_url: str) -> None:
    """Create the database named in the URL if the server does not have it yet."""
    asyncio.run(_ensure_database(database_url))


async def _ensure_database(database_url: str) -> None:
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
