"""Alembic environment: async engine, URL handed in by service.durable.migrate (no alembic.ini)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from service.core.db import metadata

config = context.config
target_metadata = metadata


def database_url() -> str:
    # Passed as an attribute rather than sqlalchemy.url because the config file parser would
    # treat a '%' in a URL-encoded password as interpolation.
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set config.attributes['database_url']")
    return str(url)


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    # NullPool: a one-shot command must not leave pooled connections behind.
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    # A caller already inside an event loop lends a sync connection via run_sync.
    run_migrations(connection)
else:
    asyncio.run(run_async_migrations())
