"""Settings, built once from the environment and passed in explicitly."""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Cluster: more start-up nodes (comma-separated host:port) for when the URL's is down.
    redis_seed_nodes: str = ""
    # How long a script call on a cluster waits out a failover or a slot migration.
    redis_cluster_retry_seconds: float = 10.0
    database_url: str = "postgresql+asyncpg://127.0.0.1:5432/boxoffice"
    admin_token: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # Holds reclaimed lazily by each hold script before it decides; bounded so that one
    # request never pays for a backlog of thousands.
    reclaim_batch: int = 50
    idempotency_ttl_seconds: int = 86400
    # How long ended holds stay readable (the contract promises at least 24 hours).
    hold_retention_seconds: int = 86400
    max_body_bytes: int = 64 * 1024
    # The worker: how often the sweeper runs, and the write-behind's batches.
    sweep_interval_seconds: float = 2.0
    outbox_batch: int = 1000
    outbox_block_ms: int = 500
    # A consumer silent this long is taken for dead: its pending entries are claimed.
    outbox_claim_idle_ms: int = 30_000
    # Failures of one outbox entry before it moves to the dead-letter stream.
    outbox_max_attempts: int = 3

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        fields: dict[str, object] = {}
        for name in cls.__struct_fields__:
            raw = env.get(f"BOXOFFICE_{name.upper()}")
            if raw is not None:
                fields[name] = raw
        # convert() with str_values turns "8000" into 8000 and rejects "eight".
        return msgspec.convert(fields, cls, strict=False)
