"""The long-lived connections of one process, opened once and passed to every operation."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import create_engine
from service.scripts import Scripts
from service.settings import Settings


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    redis: Redis
    scripts: Scripts
    engine: AsyncEngine

    @classmethod
    def open(cls, settings: Settings) -> Services:
        # Blocking: a burst beyond the pool waits for a connection instead of failing.
        # Retries: a pooled connection found dead after a Redis restart is replaced, not
        # reported. A retried script may run twice; every script is safe to repeat.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=64,
            timeout=5,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=3),
            retry_on_error=[ConnectionError, TimeoutError],
        )
        redis = Redis(connection_pool=pool)
        return cls(settings, redis, Scripts(redis, settings), create_engine(settings))

    async def close(self) -> None:
        self.scripts.close()
        await self.redis.aclose()
        await self.engine.dispose()
