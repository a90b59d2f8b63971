"""Create contacts, visitors and the events outbox.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mapper.models import RowId, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contacts",
        sa.Column("id", RowId, primary_key=True),
        sa.Column("ac_contact_id", sa.String(32), unique=True),
        sa.Column("email", sa.String(254), unique=True),
        sa.Column("ac_hash", sa.String(32), unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("ac_updated_at", UTCDateTime()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "visitors",
        sa.Column("id", RowId, primary_key=True),
        sa.Column("public_id", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "contact_id",
            RowId,
            sa.ForeignKey("contacts.id", ondelete="SET NULL"),
            index=True,
        ),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.Column("identified_at", UTCDateTime()),
        sa.Column("identified_by", sa.String(16)),
    )
    op.create_table(
        "events",
        sa.Column("id", RowId, primary_key=True),
        sa.Column(
            "visitor_id",
            RowId,
            sa.ForeignKey("visitors.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "contact_id",
            RowId,
            sa.ForeignKey("contacts.id", ondelete="CASCADE"),
            index=True,
        ),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("data", sa.Text()),
        sa.Column("client_id", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("lease_until", UTCDateTime()),
        sa.Column("delivered_at", UTCDateTime()),
        sa.Column("last_error", sa.Text()),
        sa.UniqueConstraint("visitor_id", "client_id"),
    )
    op.create_index("ix_events_due", "events", ["status", "next_attempt_at"])
    op.create_index("ix_events_visitor_status", "events", ["visitor_id", "status"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("visitors")
    op.drop_table("contacts")
