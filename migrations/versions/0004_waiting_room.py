"""Events: the waiting room's settings (all null: the event has none).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Events created before this revision have no waiting room: nulls say so.
    op.add_column("events", sa.Column("waiting_room_admit_per_minute", sa.Integer, nullable=True))
    op.add_column("events", sa.Column("waiting_room_pass_ttl_seconds", sa.Integer, nullable=True))
    op.add_column(
        "events", sa.Column("waiting_room_opens_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_check_constraint(
        op.f("ck_events_waiting_room"),
        "events",
        "(waiting_room_admit_per_minute IS NULL) = (waiting_room_pass_ttl_seconds IS NULL)"
        " AND (waiting_room_opens_at IS NULL OR waiting_room_admit_per_minute IS NOT NULL)",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_events_waiting_room"), "events")
    op.drop_column("events", "waiting_room_opens_at")
    op.drop_column("events", "waiting_room_pass_ttl_seconds")
    op.drop_column("events", "waiting_room_admit_per_minute")
