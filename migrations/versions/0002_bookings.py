"""Bookings, written behind from the outbox streams.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bookings",
        sa.Column("booking_id", sa.Uuid, nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("hold_id", sa.Text, nullable=False),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("total", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("payment_ref", sa.Text, nullable=True),
        sa.Column("seats", sa.ARRAY(sa.Text), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "persisted_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("booking_id", name=op.f("pk_bookings")),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["events.id"],
            name=op.f("fk_bookings_event_id_events"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("status IN ('confirmed', 'cancelled')", name=op.f("ck_bookings_status")),
    )
    op.create_index(op.f("ix_bookings_event_id_booking_id"), "bookings", ["event_id", "booking_id"])
    op.create_index(
        op.f("ix_bookings_event_id_customer_id"), "bookings", ["event_id", "customer_id"]
    )
    op.create_table(
        "booking_items",
        sa.Column("booking_id", sa.Uuid, nullable=False),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("tickets", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("booking_id", "category", name=op.f("pk_booking_items")),
        sa.ForeignKeyConstraint(
            ["booking_id"],
            ["bookings.booking_id"],
            name=op.f("fk_booking_items_booking_id_bookings"),
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("booking_items")
    op.drop_table("bookings")
