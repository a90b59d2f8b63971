"""Count refusals apart from other failures, and say why an event is dead.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add `refusals` (0 for existing rows) and `dead_reason`."""
    with op.batch_alter_table("events") as batch:
        batch.add_column(
            sa.Column("refusals", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("dead_reason", sa.String(16)))


def downgrade() -> None:
    """Drop the two columns; dead events become pending again first."""
    op.execute("UPDATE events SET status = 'pending' WHERE status = 'dead'")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("dead_reason")
        batch.drop_column("refusals")
