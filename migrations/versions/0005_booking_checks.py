"""Bookings: CHECK constraints for what every booking row must hold.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

# (table, constraint, condition): as service.core.db declares them.
CHECKS = (
    ("bookings", "ck_bookings_total", "total >= 0"),
    ("bookings", "ck_bookings_seats", "array_position(seats, NULL) IS NULL"),
    ("bookings", "ck_bookings_cancelled", "(status = 'cancelled') = (cancelled_at IS NOT NULL)"),
    ("booking_items", "ck_booking_items_tickets", "tickets > 0"),
    ("booking_items", "ck_booking_items_quantity", "quantity >= 0 AND quantity <= tickets"),
    ("booking_items", "ck_booking_items_position", "position >= 0"),
)


def upgrade() -> None:
    # NOT VALID first: every row written from now on is checked, and a database that
    # already holds a row breaking a rule (a forged outbox entry written before this
    # revision) still upgrades. Each constraint is then validated where no row breaks it;
    # where one does, it stays NOT VALID, the rows are named in the log, and reconcile
    # reports them (booking_invalid) and never counts stock from them.
    for table, name, condition in CHECKS:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID")
    bind = op.get_bind()
    for table, name, condition in CHECKS:
        # Names and conditions are the constants above, never input.
        query = f"SELECT DISTINCT booking_id FROM {table} WHERE NOT ({condition}) LIMIT 20"  # noqa: S608
        broken = bind.execute(sa.text(query)).scalars()
        ids = [str(i) for i in broken]
        if ids:
            log.warning(
                "%s left NOT VALID: rows of %s break it (bookings %s); reconcile reports them",
                name,
                table,
                ", ".join(ids),
            )
        else:
            op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")


def downgrade() -> None:
    for table, name, _ in reversed(CHECKS):
        op.drop_constraint(name, table)
