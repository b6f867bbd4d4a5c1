"""Events: when the event's live state left Redis (archived), when an operator asked for
that (archive_asked_at: then it goes as soon as it may, not after the ended holds'
retention), and when it was last brought back on sale (reopened).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Events created before this revision are live in Redis (or load on first use): nulls.
    op.add_column("events", sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("events", sa.Column("reopened_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "events", sa.Column("archive_asked_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("events", "archive_asked_at")
    op.drop_column("events", "reopened_at")
    op.drop_column("events", "archived_at")
