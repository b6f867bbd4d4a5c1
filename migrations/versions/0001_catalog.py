"""Catalog: events, categories, seats.

Revision ID: 0001
Revises:
Create Date: 2025-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Constraint names are spelled out (op.f) to match service.core.db's naming convention, which
    # op.create_table does not apply.
    op.create_table(
        "events",
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("on_sale_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("hold_ttl_seconds", sa.Integer, nullable=False),
        sa.Column("max_per_order", sa.Integer, nullable=False),
        sa.Column("max_per_customer", sa.Integer, nullable=True),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.CheckConstraint(
            "status IN ('on_sale', 'paused', 'closed')", name=op.f("ck_events_status")
        ),
    )
    op.create_table(
        "categories",
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("price", sa.BigInteger, nullable=False),
        sa.Column("seated", sa.Boolean, nullable=False),
        sa.Column("capacity", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("event_id", "name", name=op.f("pk_categories")),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["events.id"],
            name=op.f("fk_categories_event_id_events"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("capacity >= 0", name=op.f("ck_categories_capacity")),
        sa.CheckConstraint("price >= 0", name=op.f("ck_categories_price")),
    )
    op.create_table(
        "seats",
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("event_id", "label", name=op.f("pk_seats")),
        sa.UniqueConstraint("event_id", "position", name=op.f("uq_seats_event_id_position")),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["events.id"],
            name=op.f("fk_seats_event_id_events"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["event_id", "category"],
            ["categories.event_id", "categories.name"],
            name=op.f("fk_seats_event_id_categories"),
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("seats")
    op.drop_table("categories")
    op.drop_table("events")
