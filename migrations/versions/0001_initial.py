"""Create contacts, visitors and the events outbox.

Revision ID: 0001
Revises:
Create Date: 2026-12-04

Types are spelled out here rather than imported from mapper.models, so
that this revision stays as it was when the models change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the three tables with named constraints."""
    create_contacts()
    create_visitors()
    create_events()


def create_contacts() -> None:
    op.create_table(
        "contacts",
        sa.Column("id", ROW_ID, nullable=False),
        sa.Column("ac_contact_id", sa.String(32)),
        sa.Column("email", sa.String(254)),
        sa.Column("ac_hash", sa.String(32)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("ac_updated_at", TIME),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_contacts"),
        sa.UniqueConstraint("ac_contact_id", name="uq_contacts_ac_contact_id"),
        sa.UniqueConstraint("email", name="uq_contacts_email"),
        sa.UniqueConstraint("ac_hash", name="uq_contacts_ac_hash"),
    )


def create_visitors() -> None:
    op.create_table(
        "visitors",
        sa.Column("id", ROW_ID, nullable=False),
        sa.Column("public_id", sa.String(64), nullable=False),
        sa.Column("contact_id", ROW_ID),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("last_seen_at", TIME, nullable=False),
        sa.Column("identified_at", TIME),
        sa.Column("identified_by", sa.String(16)),
        sa.PrimaryKeyConstraint("id", name="pk_visitors"),
        sa.UniqueConstraint("public_id", name="uq_visitors_public_id"),
        sa.ForeignKeyConstraint(
            ["contact_id"],
            ["contacts.id"],
            name="fk_visitors_contact_id_contacts",
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_visitors_contact_id", "visitors", ["contact_id"])


def create_events() -> None:
    op.create_table(
        "events",
        sa.Column("id", ROW_ID, nullable=False),
        sa.Column("visitor_id", ROW_ID, nullable=False),
        sa.Column("contact_id", ROW_ID),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("data", sa.Text()),
        sa.Column("client_id", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("received_at", TIME, nullable=False),
        sa.Column("next_attempt_at", TIME, nullable=False),
        sa.Column("lease_until", TIME),
        sa.Column("lease_token", sa.String(32)),
        sa.Column("delivered_at", TIME),
        sa.Column("last_error", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.UniqueConstraint(
            "visitor_id", "client_id", name="uq_events_visitor_id_client_id"
        ),
        sa.ForeignKeyConstraint(
            ["visitor_id"],
            ["visitors.id"],
            name="fk_events_visitor_id_visitors",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["contact_id"],
            ["contacts.id"],
            name="fk_events_contact_id_contacts",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_events_contact_id", "events", ["contact_id"])
    op.create_index("ix_events_due", "events", ["status", "next_attempt_at"])
    op.create_index("ix_events_visitor_status", "events", ["visitor_id", "status"])


def downgrade() -> None:
    """Drop the tables, and every mapping with them."""
    op.drop_table("events")
    op.drop_table("visitors")
    op.drop_table("contacts")
