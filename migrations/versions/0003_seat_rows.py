"""Seats: the row and number of a seat from a seat block (null for a named seat).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Seats of events created before this revision keep nulls: which of their labels came
    # from a block is no longer known (a named seat may look like one, `BOX-1`).
    op.add_column("seats", sa.Column("row", sa.Text, nullable=True))
    op.add_column("seats", sa.Column("number", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("seats", "number")
    op.drop_column("seats", "row")
