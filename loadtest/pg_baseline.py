"""The PostgreSQL baseline of `make bench`: what the seed services do for a hold.

    BENCH_PG_DSN=postgresql://127.0.0.1:5432/boxoffice_bench \\
        .venv/bin/python -m loadtest.pg_baseline [--port 8002] [--workers 2] [--pool 16]

Stock in a PostgreSQL row; a hold is one transaction: a guarded
`UPDATE … SET available = available - n WHERE … AND available >= n` per category (the row
lock is what keeps it from overselling), then an `INSERT` of the hold. The same Litestar
route, strict msgspec decoding and Hold answer as the twin (loadtest/twin.py), served the
same way (the service's granian call, same worker count), with an asyncpg pool of
`--pool` connections per worker process. General admission only.

Its tables (`pg_baseline_stock`, `pg_baseline_holds`) live in the bench's own database
and are created and reset by `prepare()`, which loadtest/bench.py calls.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec
from litestar import Litestar, Request, post
from litestar.exceptions import HTTPException, ValidationException

from service.core import schemas
from service.core.timefmt import from_ms

HOLD_TTL_MS = 300_000
POOL_ENV = "BENCH_PG_POOL"
DSN_ENV = "BENCH_PG_DSN"

_decode = msgspec.json.Decoder(schemas.HoldCreate, strict=True).decode
_encode = msgspec.json.encode

_RESERVE = (
    "UPDATE pg_baseline_stock SET available = available - $3"
    " WHERE event_id = $1 AND category = $2 AND available >= $3"
    " RETURNING price, currency"
)
_INSERT = (
    "INSERT INTO pg_baseline_holds"
    " (hold_id, event_id, customer_id, items, total, currency, created_at, expires_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7 / 1000.0), to_timestamp($8 / 1000.0))"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS pg_baseline_stock (
    event_id text NOT NULL,
    category text NOT NULL,
    price integer NOT NULL,
    currency text NOT NULL,
    available integer NOT NULL CHECK (available >= 0),
    PRIMARY KEY (event_id, category)
);
CREATE TABLE IF NOT EXISTS pg_baseline_holds (
    hold_id text PRIMARY KEY,
    event_id text NOT NULL,
    customer_id text NOT NULL,
    items jsonb NOT NULL,
    total bigint NOT NULL,
    currency text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
"""


async def prepare(dsn: str, event_id: str, capacity: int) -> None:
    """Create the tables if missing, empty them, and put one general-admission category
    (GA, 25.00 EUR) with `capacity` tickets on sale for `event_id`."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        await conn.execute("TRUNCATE pg_baseline_stock, pg_baseline_holds")
        await conn.execute(
            "INSERT INTO pg_baseline_stock VALUES ($1, 'GA', 2500, 'EUR', $2)", event_id, capacity
        )
    finally:
        await conn.close()


async def counts(dsn: str, event_id: str) -> tuple[int, int]:
    """(holds stored, tickets still available) for `event_id`."""
    conn = await asyncpg.connect(dsn)
    try:
        holds = await conn.fetchval(
            "SELECT count(*) FROM pg_baseline_holds WHERE event_id = $1", event_id
        )
        available = await conn.fetchval(
            "SELECT available FROM pg_baseline_stock WHERE event_id = $1 AND category = 'GA'",
            event_id,
        )
        return int(holds), int(available)
    finally:
        await conn.close()


@post("/events/{event_id:str}/holds", status_code=201)
async def create_hold(request: Request[Any, Any, Any], event_id: str) -> schemas.Hold:
    try:
        body = _decode(await request.body())
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ValidationException(str(e)) from e
    if not body.items or body.seats:
        raise ValidationException("the baseline holds general-admission `items` only")
    hold_id = secrets.token_urlsafe(16)
    now = int(time.time() * 1000)
    total, currency = 0, ""
    pool = request.app.state.pool
    async with pool.acquire() as conn, conn.transaction():
        for item in body.items:
            row = await conn.fetchrow(_RESERVE, event_id, item.category, item.quantity)
            if row is None:  # rolls the transaction back
                raise HTTPException(status_code=409, detail="sold_out")
            total += row["price"] * item.quantity
            currency = row["currency"]
        items = _encode([(i.category, i.quantity) for i in body.items]).decode()
        await conn.execute(
            _INSERT, hold_id, event_id, body.customer_id, items, total, currency, now,
            now + HOLD_TTL_MS,
        )  # fmt: skip
    return schemas.Hold(
        hold_id=hold_id,
        event_id=event_id,
        customer_id=body.customer_id,
        status="held",
        created_at=from_ms(now),
        expires_at=from_ms(now + HOLD_TTL_MS),
        items=body.items,
        seats=[],
        total=total,
        currency=currency,
    )


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    size = int(os.environ.get(POOL_ENV, "16"))
    pool = await asyncpg.create_pool(os.environ[DSN_ENV], min_size=size, max_size=size)
    app.state.pool = pool
    try:
        yield
    finally:
        await pool.close()


app = Litestar(route_handlers=[create_hold], lifespan=[lifespan], openapi_config=None)


def main() -> None:
    from loadtest.twin import serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pool", type=int, default=16, help="connections per worker process")
    args = parser.parse_args()
    os.environ[POOL_ENV] = str(args.pool)
    serve("loadtest.pg_baseline:app", args.port, args.workers)


if __name__ == "__main__":
    main()
