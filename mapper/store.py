"""Reads and writes of the mapping: contacts, visitors, and held events.

Functions here take an open session and leave committing to the caller, so
that one request is one transaction. Emails arrive already normalized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from mapper.models import Contact, Event, Visitor, utcnow
from mapper.tokens import VisitorId, new_visitor_id

T = TypeVar("T")
TRANSACTION_ATTEMPTS = 3


@dataclass(frozen=True)
class ContactFacts:
    """What AC told us about one contact, at one moment."""

    ac_contact_id: str
    email: str
    as_of: datetime
    source: str
    status: str | None = None
    ac_hash: str | None = None


def run_transaction(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction, retrying when a racing writer wins.

    Two deliveries of the same webhook can both try to insert a contact;
    the loser sees the winner's row on its next attempt.
    """
    attempt = 1
    while True:
        try:
            with sessions.begin() as session:
                return work(session)
        except (IntegrityError, OperationalError):
            if attempt == TRANSACTION_ATTEMPTS:
                raise
            attempt += 1


def _insert(session: Session, model: type[Any]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that can say what to do on conflict, in this dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


def record_contact(session: Session, facts: ContactFacts) -> None:
    """Insert or update a contact by AC id, unless what we hold is newer.

    An older `as_of` than the stored one changes nothing, so a late or
    repeated webhook cannot undo a newer change.
    """
    _release_claims(session, facts)
    now = utcnow()
    changes: dict[str, Any] = {
        "email": None if _held_elsewhere(session, facts) else facts.email,
        "ac_updated_at": facts.as_of,
        "updated_at": now,
    }
    if facts.status is not None:
        changes["status"] = facts.status
    if facts.ac_hash is not None:
        changes["ac_hash"] = facts.ac_hash

    insert = _insert(session, Contact).values(
        {
            "status": "active",
            **changes,
            "ac_contact_id": facts.ac_contact_id,
            "source": facts.source,
            "created_at": now,
        }
    )
    stored_at = Contact.__table__.c.ac_updated_at
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["ac_contact_id"],
            set_=changes,
            where=or_(stored_at.is_(None), stored_at <= insert.excluded.ac_updated_at),
        )
    )


def _release_claims(session: Session, facts: ContactFacts) -> None:
    # AC keeps an address (and a hash) on one contact at a time. When a newer
    # fact gives it to this contact, another row still holding it has moved
    # on in AC, and gives it up until AC tells us its new value.
    others = or_(
        Contact.ac_contact_id.is_(None), Contact.ac_contact_id != facts.ac_contact_id
    )
    not_newer = or_(
        Contact.ac_updated_at.is_(None), Contact.ac_updated_at <= facts.as_of
    )
    session.execute(
        update(Contact)
        .where(Contact.email == facts.email, others, not_newer)
        .values(email=None, updated_at=utcnow())
    )
    if facts.ac_hash is not None:
        session.execute(
            update(Contact)
            .where(Contact.ac_hash == facts.ac_hash, others)
            .values(ac_hash=None, updated_at=utcnow())
        )


def _held_elsewhere(session: Session, facts: ContactFacts) -> bool:
    # Still held by another contact: AC gave that contact the address more
    # recently than these facts, so this contact's current one is unknown.
    query = select(Contact.id).where(
        Contact.email == facts.email,
        or_(
            Contact.ac_contact_id.is_(None),
            Contact.ac_contact_id != facts.ac_contact_id,
        ),
    )
    return session.execute(query).first() is not None


def find_contact_by_hash(session: Session, ac_hash: str) -> Contact | None:
    return session.scalars(select(Contact).where(Contact.ac_hash == ac_hash)).first()


def touch_visitor(session: Session, public_id: VisitorId | None) -> Visitor:
    """Return the visitor with `public_id`, or a new anonymous one.

    A valid signature on an id we no longer hold (erased, or another
    database) also starts a new visitor.
    """
    now = utcnow()
    visitor = None
    if public_id is not None:
        query = select(Visitor).where(Visitor.public_id == public_id)
        visitor = session.scalars(query).first()

    if visitor is None:
        visitor = Visitor(public_id=new_visitor_id(), created_at=now)
        session.add(visitor)
    visitor.last_seen_at = now
    session.flush()
    return visitor


def identify_visitor(
    session: Session, visitor: Visitor, contact: Contact, *, how: str
) -> None:
    """Bind `visitor` to `contact` and release its held events for delivery."""
    now = utcnow()
    visitor.contact_id = contact.id
    visitor.identified_at = now
    visitor.identified_by = how
    session.flush()

    session.execute(
        update(Event)
        .where(Event.visitor_id == visitor.id, Event.status == "held")
        .values(contact_id=contact.id, status="pending", next_attempt_at=now)
    )


def add_event(
    session: Session,
    visitor: Visitor,
    *,
    name: str,
    data: str | None,
    client_id: str | None,
) -> bool:
    """Put an event in the outbox; return False if it is a repeat.

    A repeat is a second event from the same visitor with the same client
    id, as a browser sends when it retries.
    """
    now = utcnow()
    identified = visitor.contact_id is not None
    insert = _insert(session, Event).values(
        visitor_id=visitor.id,
        contact_id=visitor.contact_id,
        name=name,
        data=data,
        client_id=client_id,
        status="pending" if identified else "held",
        attempts=0,
        received_at=now,
        next_attempt_at=now,
    )
    result = session.execute(insert.on_conflict_do_nothing())
    return bool(result.rowcount)  # type: ignore[attr-defined]
