"""Store helpers that the endpoints rely on, on both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from mapper.db import make_sessionmaker
from mapper.errors import StoreConflict
from mapper.models import Source, utcnow
from mapper.store import (
    ContactFacts,
    HoldLimit,
    Intake,
    NewEvent,
    add_events,
    record_contact,
    run_transaction,
    touch_visitor,
)
from mapper.tokens import VisitorId, make_visitor_id
from tests.helpers import (
    EMAIL,
    HASH,
    add_visitors_with_events,
    contacts,
    events,
    visitors,
)


def test_run_transaction_gives_up(engine: Engine) -> None:
    calls: list[int] = []

    def always_conflicts(session: Session) -> None:
        calls.append(1)
        failure = Exception(f"UNIQUE constraint failed: contacts.email ({EMAIL})")
        raise IntegrityError("INSERT", {}, failure)

    with pytest.raises(StoreConflict) as caught:
        run_transaction(make_sessionmaker(engine), always_conflicts)

    assert len(calls) == 3
    assert caught.value.__cause__ is None and EMAIL not in str(caught.value)


def test_run_transaction_rolls_back(engine: Engine) -> None:
    def fails_after_write(session: Session) -> None:
        touch_visitor(session, None)
        raise RuntimeError("after the write")

    with pytest.raises(RuntimeError):
        run_transaction(make_sessionmaker(engine), fails_after_write)
    assert visitors(engine) == []


def test_touch_visitor_unknown_id(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    stale = make_visitor_id()

    created = run_transaction(sessions, lambda s: touch_visitor(s, stale).public_id)

    assert created != stale
    assert [v.public_id for v in visitors(engine)] == [created]


def test_run_transaction_faults_raise(engine: Engine) -> None:
    calls: list[int] = []

    def broken(session: Session) -> None:
        calls.append(1)
        raise OperationalError("SELECT", {}, Exception("no such table: x"))

    with pytest.raises(OperationalError):
        run_transaction(make_sessionmaker(engine), broken)

    assert len(calls) == 1


class PostgresConflict(Exception):
    """Stands for psycopg's error object: what PostgreSQL reports is its code."""

    sqlstate = "40001"


def test_run_transaction_retries_conflict(engine: Engine) -> None:
    calls: list[int] = []

    def conflict_once(session: Session) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("UPDATE", {}, PostgresConflict())
        return "done"

    assert run_transaction(make_sessionmaker(engine), conflict_once) == "done"
    assert len(calls) == 2


def test_run_transaction_other_integrity_raises(engine: Engine) -> None:
    calls: list[int] = []

    def null_column(session: Session) -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, Exception("NOT NULL constraint failed"))

    with pytest.raises(IntegrityError):
        run_transaction(make_sessionmaker(engine), null_column)

    assert len(calls) == 1


def test_record_contact_older_lookup_keeps_hash(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    later = utcnow()
    webhook = ContactFacts("42", EMAIL, later, Source.WEBHOOK)
    lookup = ContactFacts(
        "42", EMAIL, later - timedelta(seconds=1), Source.HASH, ac_hash=HASH
    )

    for facts in (webhook, lookup):
        with sessions.begin() as session:
            record_contact(session, facts)

    assert [c.ac_hash for c in contacts(engine)] == [HASH]


def test_add_events_keeps_order(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    first = run_transaction(
        sessions, lambda s: add_events(s, [NewEvent(None, "e0", None, None)], hold=None)
    )
    visitor = first[0].visitor
    batch = [NewEvent(visitor, f"e{n}", None, None) for n in range(1, 300)]

    run_transaction(sessions, lambda s: add_events(s, batch, hold=None))

    assert [event.name for event in events(engine)] == [f"e{n}" for n in range(300)]


def test_add_events_unknown_visitors(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    stale = make_visitor_id()
    batch = [NewEvent(None, "a", None, None), NewEvent(stale, "b", None, None)]

    stored = run_transaction(sessions, lambda s: add_events(s, batch, hold=None))

    assert len({event.visitor for event in stored} | {stale}) == 3
    assert len(visitors(engine)) == 2


def test_add_events_batch_rules(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    hold = HoldLimit(3, utcnow() - timedelta(hours=1))
    [first] = run_transaction(
        sessions, lambda s: add_events(s, [NewEvent(None, "e0", None, "c0")], hold=hold)
    )
    anonymous = first.visitor
    batch = [
        NewEvent(anonymous, "e1", None, "c1"),
        NewEvent(anonymous, "e2", None, "c1"),
        NewEvent(anonymous, "e3", None, "c0"),
        NewEvent(anonymous, "e4", None, None),
        NewEvent(anonymous, "e5", None, None),
    ]

    stored = run_transaction(sessions, lambda s: add_events(s, batch, hold=hold))

    assert [event.intake for event in stored] == [
        Intake.STORED,
        Intake.REPEATED,
        Intake.REPEATED,
        Intake.STORED,
        Intake.HELD_FULL,
    ]
    assert [event.name for event in events(engine)] == ["e0", "e1", "e4"]


def test_add_events_identified_uncapped(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    add_visitors_with_events(sessions, visitors=1, each=0)
    [visitor] = visitors(engine)
    hold = HoldLimit(1, utcnow() - timedelta(hours=1))
    named = VisitorId(visitor.public_id)
    batch = [NewEvent(named, f"e{n}", None, None) for n in range(3)]

    stored = run_transaction(sessions, lambda s: add_events(s, batch, hold=hold))

    assert {event.intake for event in stored} == {Intake.STORED}
    assert {event.status for event in events(engine)} == {"pending"}
