"""What operators do with the outbox: count it, list it, replay dead events.

Nothing here reads an email or an event's data; a listing shows AC's
message with anything shaped like an address, a hash or a key blanked
out, since AC's wording is not documented and could quote them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from mapper.models import Event, EventStatus, utcnow

ADDRESS = re.compile(r"\S+@\S+")
# A run of hex as long as a contact hash or an event key.
HEX_TOKEN = re.compile(r"\b[0-9a-fA-F]{32,}\b")


@dataclass(frozen=True)
class OutboxCounts:
    """Events per status, and dead events per reason."""

    by_status: dict[str, int]
    dead_by_reason: dict[str, int]


@dataclass(frozen=True)
class EventLine:
    """One event as an operator sees it: no email, no data."""

    id: int
    status: str
    name: str
    attempts: int
    received_at: datetime
    dead_reason: str | None
    last_error: str | None


def count_by_status(session: Session) -> dict[str, int]:
    """Events per status, every status listed, those without events as 0."""
    rows = session.execute(select(Event.status, func.count()).group_by(Event.status))
    found = {status: count for status, count in rows}
    return {status.value: found.get(status.value, 0) for status in EventStatus}


def count_events(sessions: sessionmaker[Session]) -> OutboxCounts:
    """Count every status, and the dead events by reason."""
    with sessions() as session:
        by_status = count_by_status(session)
        reasons = session.execute(
            select(Event.dead_reason, func.count())
            .where(Event.status == EventStatus.DEAD)
            .group_by(Event.dead_reason)
        )
        dead = {str(reason): count for reason, count in reasons}
    return OutboxCounts(by_status, dead)


def list_events(
    sessions: sessionmaker[Session], *, status: EventStatus, limit: int
) -> list[EventLine]:
    """The oldest `limit` events with `status`."""
    query = select(Event).where(Event.status == status).order_by(Event.id).limit(limit)
    with sessions() as session:
        return [_line(event) for event in session.scalars(query)]


def _line(event: Event) -> EventLine:
    error = event.last_error
    if error is not None:
        error = ADDRESS.sub("<address>", error)
        error = HEX_TOKEN.sub("<hex>", error)
        # One event per line, its fields split by tabs.
        error = " ".join(error.split())
    return EventLine(
        id=event.id,
        status=event.status,
        name=event.name,
        attempts=event.attempts,
        received_at=event.received_at,
        dead_reason=event.dead_reason,
        last_error=error,
    )


def replay_dead(
    sessions: sessionmaker[Session],
    *,
    reason: str | None = None,
    ids: Sequence[int] = (),
) -> int:
    """Queue dead events for delivery again; return how many.

    All dead events, or those dead for `reason`, or those in `ids`. Their
    refusal count starts again, so each gets its full number of tries.
    """
    query = update(Event).where(Event.status == EventStatus.DEAD)
    if reason is not None:
        query = query.where(Event.dead_reason == reason)
    if ids:
        query = query.where(Event.id.in_(ids))

    with sessions.begin() as session:
        result = session.execute(
            query.values(
                status=EventStatus.PENDING,
                refusals=0,
                dead_reason=None,
                next_attempt_at=utcnow(),
                lease_until=None,
                lease_token=None,
            )
        )
    return int(result.rowcount)  # type: ignore[attr-defined]
