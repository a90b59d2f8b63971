"""Reads and writes of the mapping: contacts, visitors, and held events.

Functions here take an open session and leave committing to the caller, so
that one request is one transaction. They write emails and AC hashes to
`contacts` only; emails arrive already normalized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar, cast

from sqlalchemy import ColumnElement, Table, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from mapper.errors import StoreConflict
from mapper.models import (
    Contact,
    ContactStatus,
    Event,
    EventStatus,
    Source,
    Visitor,
    utcnow,
)
from mapper.tokens import VisitorId, make_visitor_id

T = TypeVar("T")
TRANSACTION_ATTEMPTS = 3
# PostgreSQL's serialization failure and deadlock: the transaction lost to
# another and may simply be run again.
RETRIED_SQLSTATES = {"40001", "40P01"}
# The tables themselves, for statements that need none of the ORM's work.
VISITORS = cast(Table, Visitor.__table__)
EVENTS = cast(Table, Event.__table__)


@dataclass(frozen=True)
class ContactFacts:
    """What AC told us about one contact, at one moment."""

    ac_contact_id: str
    email: str
    as_of: datetime
    source: Source
    status: ContactStatus | None = None
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
        except (IntegrityError, OperationalError) as exc:
            if not _lost_a_race(exc):
                raise
            if attempt == TRANSACTION_ATTEMPTS:
                # The database's message can quote the conflicting row.
                raise StoreConflict("Concurrent writers kept colliding.") from None
            attempt += 1


def _lost_a_race(exc: IntegrityError | OperationalError) -> bool:
    """Whether trying again may succeed: another writer took a unique key
    first, or PostgreSQL chose this transaction to fail in a conflict.

    SQLite's "database is locked" is not retried: it comes only after the
    30-second busy timeout, and a retry would hold the request for longer.
    """
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if isinstance(exc, IntegrityError):
        return sqlstate == "23505" or "UNIQUE constraint failed" in str(exc.orig)
    return sqlstate in RETRIED_SQLSTATES


def _insert(session: Session, model: type[Any]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that can say what to do on conflict, in this dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


def record_contact(session: Session, facts: ContactFacts) -> bool:
    """Insert or update a contact by AC id, unless what we hold is newer.

    An older `as_of` than the stored one changes nothing, so a late or
    repeated webhook cannot undo a newer change. Returns whether the facts
    were stored.
    """
    stored_at = session.scalar(
        select(Contact.ac_updated_at).where(
            Contact.ac_contact_id == facts.ac_contact_id
        )
    )
    if stored_at is not None and stored_at > facts.as_of:
        _attach_hash(session, facts)
        return False

    _release_claims(session, facts)
    changes = _changes(session, facts)
    insert = _insert(session, Contact).values(
        {
            "status": ContactStatus.ACTIVE,
            **changes,
            "ac_contact_id": facts.ac_contact_id,
            "source": facts.source,
            "created_at": changes["updated_at"],
        }
    )

    # The guard repeats the check above for a writer that raced this one.
    column = Contact.__table__.c.ac_updated_at
    newer = or_(column.is_(None), column <= insert.excluded.ac_updated_at)
    upsert = insert.on_conflict_do_update(
        index_elements=["ac_contact_id"], set_=changes, where=newer
    )
    return bool(session.execute(upsert).rowcount)  # type: ignore[attr-defined]


def _attach_hash(session: Session, facts: ContactFacts) -> None:
    # A contact's hash does not change with its other fields, so a lookup
    # answer older than the stored row still says which hash it has.
    if facts.ac_hash is None:
        return
    _release_hash(session, facts)
    session.execute(
        update(Contact)
        .where(Contact.ac_contact_id == facts.ac_contact_id)
        .values(ac_hash=facts.ac_hash, updated_at=utcnow())
    )


def _changes(session: Session, facts: ContactFacts) -> dict[str, Any]:
    changes: dict[str, Any] = {
        "email": None if _held_elsewhere(session, facts) else facts.email,
        "ac_updated_at": facts.as_of,
        "updated_at": utcnow(),
    }
    if facts.status is not None:
        changes["status"] = facts.status
    if facts.ac_hash is not None:
        changes["ac_hash"] = facts.ac_hash
    return changes


def _other_contacts(facts: ContactFacts) -> ColumnElement[bool]:
    return or_(
        Contact.ac_contact_id.is_(None),
        Contact.ac_contact_id != facts.ac_contact_id,
    )


def _release_claims(session: Session, facts: ContactFacts) -> None:
    # AC keeps an address (and a hash) on one contact at a time. When a newer
    # fact gives it to this contact, another row still holding it has moved
    # on in AC, and gives it up until AC tells us its new value.
    not_newer = or_(
        Contact.ac_updated_at.is_(None), Contact.ac_updated_at <= facts.as_of
    )
    session.execute(
        update(Contact)
        .where(Contact.email == facts.email, _other_contacts(facts), not_newer)
        .values(email=None, updated_at=utcnow())
    )
    _release_hash(session, facts)


def _release_hash(session: Session, facts: ContactFacts) -> None:
    if facts.ac_hash is not None:
        session.execute(
            update(Contact)
            .where(Contact.ac_hash == facts.ac_hash, _other_contacts(facts))
            .values(ac_hash=None, updated_at=utcnow())
        )


def _held_elsewhere(session: Session, facts: ContactFacts) -> bool:
    # Still held by another contact: AC gave that contact the address more
    # recently than these facts, so this contact's current one is unknown.
    query = select(Contact.id).where(
        Contact.email == facts.email, _other_contacts(facts)
    )
    return session.execute(query).first() is not None


def find_contact_by_hash(session: Session, ac_hash: str) -> Contact | None:
    """The contact AC gave `ac_hash` to, if mapper has learned it."""
    query = select(Contact).where(Contact.ac_hash == ac_hash)
    return session.scalars(query).first()


def touch_visitor(session: Session, public_id: VisitorId | None) -> Visitor:
    """Return the visitor with `public_id`, or a new anonymous one.

    It is locked and marked as seen, as `add_events` does for its visitors.
    """
    [row] = _touch_visitors(session, [public_id], now=utcnow())
    visitor = session.get(Visitor, row.id)
    assert visitor is not None
    return visitor


def identify_visitor(
    session: Session,
    visitor: Visitor,
    contact: Contact,
    *,
    how: Source,
    held_since: datetime,
) -> None:
    """Bind `visitor` to `contact` and release its held events for delivery.

    Held events received before `held_since` have expired and stay held
    until the delivery loop drops them.
    """
    now = utcnow()
    visitor.contact_id = contact.id
    visitor.identified_at = now
    visitor.identified_by = how
    session.flush()

    session.execute(
        update(Event)
        .where(
            Event.visitor_id == visitor.id,
            Event.status == EventStatus.HELD,
            Event.received_at >= held_since,
        )
        .values(contact_id=contact.id, status=EventStatus.PENDING, next_attempt_at=now)
    )


def held_since(ttl: int) -> datetime:
    """The oldest intake time a held event may have and still be kept."""
    return utcnow() - timedelta(seconds=ttl)


class Intake(StrEnum):
    """What `add_events` did with an event."""

    STORED = "stored"
    REPEATED = "repeated"  # the visitor sent this client id before
    HELD_FULL = "held_full"  # the anonymous visitor has all it may hold


@dataclass(frozen=True)
class HoldLimit:
    """How many events an anonymous visitor may hold, and since when."""

    most: int
    since: datetime


@dataclass(frozen=True)
class NewEvent:
    """An event as received, with the visitor id from its cookie, if any.

    Without a visitor id (no good cookie), the event starts a new visitor.
    """

    visitor: VisitorId | None
    name: str
    data: str | None
    client_id: str | None


@dataclass(frozen=True)
class StoredEvent:
    """What became of a `NewEvent`, and the visitor it now belongs to."""

    visitor: VisitorId
    intake: Intake


@dataclass(frozen=True)
class _VisitorRow:
    id: int
    public_id: VisitorId
    contact_id: int | None


def add_events(
    session: Session, events: Sequence[NewEvent], *, hold: HoldLimit | None
) -> list[StoredEvent]:
    """Put events in the outbox, in their order, each for its visitor.

    A few statements serve any number of events, so that one transaction
    can take the events of many requests. Each visitor is marked as seen
    and locked, so that a landing binding it at the same time cannot leave
    an event held for a visitor already identified, and racing requests
    cannot both take an anonymous visitor's last place.

    A repeat is an event with a client id its visitor sent before, as a
    browser sends when it retries; it is dropped without error. An
    anonymous visitor's events are held, up to `hold.most` received since
    `hold.since` (no limit without `hold`).
    """
    now = utcnow()
    visitors = _touch_visitors(session, [event.visitor for event in events], now=now)
    sent = _sent_client_ids(session, visitors=visitors, events=events)
    held = _held_counts(session, visitors=visitors, hold=hold)

    rows: list[dict[str, Any]] = []
    stored: list[StoredEvent] = []
    for event, visitor in zip(events, visitors, strict=True):
        intake = _take(event, visitor, sent=sent, held=held, hold=hold)
        stored.append(StoredEvent(visitor.public_id, intake))
        if intake is Intake.STORED:
            rows.append(_event_row(event, visitor, now=now))

    if rows:
        # Rows go in in this order, so a visitor's events keep theirs.
        session.execute(insert(EVENTS), rows)
    return stored


def _touch_visitors(
    session: Session, public_ids: Sequence[VisitorId | None], *, now: datetime
) -> list[_VisitorRow]:
    """Lock, mark as seen and read the visitor of each id, or make a new one.

    The lock keeps a landing that binds a visitor at the same time from
    leaving an event held for a visitor already identified. Rows are locked
    in the order of their ids, so that two batches sharing visitors cannot
    each wait for a lock the other holds.
    """
    known = {public_id for public_id in public_ids if public_id is not None}
    found: dict[str | None, _VisitorRow] = {}
    if known:
        query = (
            select(VISITORS.c.id, VISITORS.c.public_id, VISITORS.c.contact_id)
            .where(VISITORS.c.public_id.in_(known))
            .order_by(VISITORS.c.id)
            .with_for_update()
        )
        found = {row.public_id: _VisitorRow(*row) for row in session.execute(query)}
    if found:
        session.execute(
            update(VISITORS)
            .where(VISITORS.c.id.in_([row.id for row in found.values()]))
            .values(last_seen_at=now)
        )

    # A valid signature on an id we no longer hold (erased, or another
    # database) also starts a new visitor.
    return [
        found.get(public_id) or _new_visitor(session, now) for public_id in public_ids
    ]


def _new_visitor(session: Session, now: datetime) -> _VisitorRow:
    public_id = make_visitor_id()
    row_id = session.scalar(
        insert(VISITORS)
        .values(public_id=public_id, created_at=now, last_seen_at=now)
        .returning(VISITORS.c.id)
    )
    assert row_id is not None
    return _VisitorRow(row_id, public_id, None)


def _sent_client_ids(
    session: Session, *, visitors: Sequence[_VisitorRow], events: Sequence[NewEvent]
) -> set[tuple[int, str]]:
    """The (visitor, client id) pairs among `events` already stored."""
    pairs = {
        (visitor.id, event.client_id)
        for visitor, event in zip(visitors, events, strict=True)
        if event.client_id is not None
    }
    if not pairs:
        return set()
    query = select(Event.visitor_id, Event.client_id).where(
        Event.visitor_id.in_({visitor for visitor, _ in pairs}),
        Event.client_id.in_({client_id for _, client_id in pairs}),
    )
    return {(row.visitor_id, row.client_id) for row in session.execute(query)} & pairs


def _held_counts(
    session: Session, *, visitors: Sequence[_VisitorRow], hold: HoldLimit | None
) -> dict[int, int]:
    """How many events each anonymous visitor among `visitors` holds."""
    anonymous = {visitor.id for visitor in visitors if visitor.contact_id is None}
    if hold is None or not anonymous:
        return {}
    query = (
        select(Event.visitor_id, func.count())
        .where(
            Event.visitor_id.in_(anonymous),
            Event.status == EventStatus.HELD,
            Event.received_at >= hold.since,
        )
        .group_by(Event.visitor_id)
    )
    return {visitor_id: count for visitor_id, count in session.execute(query)}


def _take(
    event: NewEvent,
    visitor: _VisitorRow,
    *,
    sent: set[tuple[int, str]],
    held: dict[int, int],
    hold: HoldLimit | None,
) -> Intake:
    """Decide what becomes of `event`, counting it if it is stored."""
    client = None if event.client_id is None else (visitor.id, event.client_id)
    if client in sent:
        return Intake.REPEATED

    if visitor.contact_id is None and hold is not None:
        holding = held.get(visitor.id, 0)
        if holding >= hold.most:
            return Intake.HELD_FULL
        held[visitor.id] = holding + 1
    if client is not None:
        sent.add(client)
    return Intake.STORED


def _event_row(
    event: NewEvent, visitor: _VisitorRow, *, now: datetime
) -> dict[str, Any]:
    identified = visitor.contact_id is not None
    return {
        "visitor_id": visitor.id,
        "contact_id": visitor.contact_id,
        "name": event.name,
        "data": event.data,
        "client_id": event.client_id,
        "status": EventStatus.PENDING if identified else EventStatus.HELD,
        "attempts": 0,
        "refusals": 0,
        "received_at": now,
        "next_attempt_at": now,
    }
