"""The tables: contacts (the only one with emails), visitors, and the outbox.

Everything outside `contacts` refers to a person by row id, so erasing a
contact's row removes the address from the database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints, so that later batch migrations on SQLite can find them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    SQLite keeps no offset, so the value is normalized to UTC on the way in
    and labelled UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError("Expected a timezone-aware datetime.")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class EventStatus(StrEnum):
    """Where an event is between intake and AC."""

    HELD = "held"  # the visitor is not identified yet
    PENDING = "pending"  # waiting for delivery, or for another try
    DELIVERED = "delivered"
    DEAD = "dead"  # given up on; `mapper events replay` queues it again


class DeadReason(StrEnum):
    """Why delivery gave up on an event; `last_error` keeps AC's words."""

    REFUSED = "refused"  # AC refused the event itself, every time it was tried


class ContactStatus(StrEnum):
    """A contact's subscription state, as AC's last webhook gave it."""

    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"


class Source(StrEnum):
    """How mapper learned of a contact or identified a visitor."""

    WEBHOOK = "webhook"
    HASH = "hash"


class Base(DeclarativeBase):
    """The declarative base; its metadata names every constraint."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Contact(Base):
    """An AC contact and its current, normalized email address."""

    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    ac_contact_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    # Null only while AC has moved this address to another contact and has
    # not yet told us this contact's new one.
    email: Mapped[str | None] = mapped_column(String(254), unique=True)
    ac_hash: Mapped[str | None] = mapped_column(String(32), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=ContactStatus.ACTIVE)
    source: Mapped[str] = mapped_column(String(16))
    ac_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Visitor(Base):
    """A browser, known by the random id in its signed cookie."""

    __tablename__ = "visitors"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(64), unique=True)
    contact_id: Mapped[int | None] = mapped_column(
        ForeignKey("contacts.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    identified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    identified_by: Mapped[str | None] = mapped_column(String(16))


class Event(Base):
    """One tracked event in the outbox, from intake until AC accepts it.

    A worker that claims the event writes a random `lease_token` and a
    `lease_until`; only the holder of the token may record the outcome.
    `attempts` counts every send, `refusals` only those AC refused, which
    are the ones that can make an event dead.
    """

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("visitor_id", "client_id"),
        Index("ix_events_due", "status", "next_attempt_at"),
        Index("ix_events_visitor_status", "visitor_id", "status"),
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    visitor_id: Mapped[int] = mapped_column(
        ForeignKey("visitors.id", ondelete="CASCADE")
    )
    contact_id: Mapped[int | None] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(32))
    data: Mapped[str | None] = mapped_column(Text)
    client_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    refusals: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_token: Mapped[str | None] = mapped_column(String(32))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    dead_reason: Mapped[str | None] = mapped_column(String(16))
