"""PostgreSQL tables (SQLAlchemy Core) and the engine."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from service.core.settings import Settings

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("on_sale_at", sa.DateTime(timezone=True), nullable=True),
    # Admin-set state; "scheduled" is derived from on_sale_at, never stored.
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("hold_ttl_seconds", sa.Integer, nullable=False),
    sa.Column("max_per_order", sa.Integer, nullable=False),
    sa.Column("max_per_customer", sa.Integer, nullable=True),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    # The waiting room (all null: none): admissions a minute, how long a pass lasts, and
    # when joining starts (null: at once).
    sa.Column("waiting_room_admit_per_minute", sa.Integer, nullable=True),
    sa.Column("waiting_room_pass_ttl_seconds", sa.Integer, nullable=True),
    sa.Column("waiting_room_opens_at", sa.DateTime(timezone=True), nullable=True),
    # Set while the event's live state is out of Redis (service/durable/archive.py): reads come
    # from here then, and only selling it again loads it. `archive_asked_at`: an operator
    # asked for it (then it goes as soon as it is drained). `reopened_at`: when it was last
    # put back on sale; the time rule of "over" counts from then too.
    sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("archive_asked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("reopened_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('on_sale', 'paused', 'closed')", name="status"),
    sa.CheckConstraint(
        "(waiting_room_admit_per_minute IS NULL) = (waiting_room_pass_ttl_seconds IS NULL)"
        " AND (waiting_room_opens_at IS NULL OR waiting_room_admit_per_minute IS NOT NULL)",
        name="waiting_room",
    ),
)

categories = sa.Table(
    "categories",
    metadata,
    sa.Column(
        "event_id", sa.Text, sa.ForeignKey("events.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("price", sa.BigInteger, nullable=False),
    sa.Column("seated", sa.Boolean, nullable=False),
    sa.Column("capacity", sa.Integer, nullable=False),
    sa.CheckConstraint("capacity >= 0", name="capacity"),
    sa.CheckConstraint("price >= 0", name="price"),
)

seats = sa.Table(
    "seats",
    metadata,
    sa.Column(
        "event_id", sa.Text, sa.ForeignKey("events.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("label", sa.Text, primary_key=True),
    sa.Column("category", sa.Text, nullable=False),
    # Order of the seat within the whole event: categories in their order, then each
    # category's seats in theirs. Best-available picks the lowest positions.
    sa.Column("position", sa.Integer, nullable=False),
    # Where a seat from a seat block stands, for drawing the map; null for a named seat.
    sa.Column("row", sa.Text, nullable=True),
    sa.Column("number", sa.Integer, nullable=True),
    sa.UniqueConstraint("event_id", "position"),
    sa.ForeignKeyConstraint(
        ["event_id", "category"], ["categories.event_id", "categories.name"], ondelete="CASCADE"
    ),
)


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.database_url,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        pool_timeout=settings.database_pool_timeout_seconds,
        # asyncpg's: `timeout` bounds connecting, `command_timeout` every statement (the
        # server is asked to cancel it, and the caller gets TimeoutError).
        connect_args={
            "timeout": settings.database_connect_timeout_seconds,
            "command_timeout": settings.database_command_timeout_seconds,
        },
    )


async def driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under a SQLAlchemy one: whole batches as arrays."""
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    return raw


# --- bookings: written behind, from the outbox streams ----------------------------------

bookings = sa.Table(
    "bookings",
    metadata,
    sa.Column("booking_id", sa.Uuid, primary_key=True),
    sa.Column("event_id", sa.Text, sa.ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    sa.Column("hold_id", sa.Text, nullable=False),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("total", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("payment_ref", sa.Text, nullable=True),
    # In the order the hold assigned them: named seats first, then best-available picks.
    sa.Column("seats", sa.ARRAY(sa.Text), nullable=False),
    sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column(
        "persisted_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.CheckConstraint("status IN ('confirmed', 'cancelled')", name="status"),
    # What a row must hold (migration 0005); what takes the catalog or other rows to
    # check, the write-behind checks before it writes (service/core/bookingrules.py).
    sa.CheckConstraint("total >= 0", name="total"),
    sa.CheckConstraint("array_position(seats, NULL) IS NULL", name="seats"),
    sa.CheckConstraint("(status = 'cancelled') = (cancelled_at IS NOT NULL)", name="cancelled"),
    sa.Index(None, "event_id", "booking_id"),
    sa.Index(None, "event_id", "customer_id"),
)

# Per category: `quantity` as the customer asked in `items` (0 when only named seats),
# `tickets` all of the booking's tickets in it, named seats included.
booking_items = sa.Table(
    "booking_items",
    metadata,
    sa.Column(
        "booking_id",
        sa.Uuid,
        sa.ForeignKey("bookings.booking_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("category", sa.Text, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("tickets", sa.Integer, nullable=False),
    sa.CheckConstraint("tickets > 0", name="tickets"),
    sa.CheckConstraint("quantity >= 0 AND quantity <= tickets", name="quantity"),
    sa.CheckConstraint("position >= 0", name="position"),
)
