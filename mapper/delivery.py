"""The delivery loop: takes due events from the outbox and posts them to AC.

Each event's email is read from `contacts` at delivery time, so an address
changed by a webhook after the event was tracked is the one AC receives.
No AC contact lookup happens here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from mapper.clients import ACClient, DeliveryResult
from mapper.models import Contact, Event, utcnow
from mapper.settings import Settings

logger = logging.getLogger(__name__)

BACKOFF_BASE = 2.0
BACKOFF_MAX = 3600.0


@dataclass(frozen=True)
class Claim:
    """An event leased to this worker for one delivery attempt."""

    event_id: int
    name: str
    data: str | None
    email: str


def backoff(attempts: int) -> timedelta:
    """How long to wait after the `attempts`-th failure, with jitter.

    The jitter spreads retries out, so that a backlog does not return to AC
    all at once after an outage.
    """
    delay = min(BACKOFF_BASE ** min(attempts, 16), BACKOFF_MAX)
    return timedelta(seconds=delay * random.uniform(0.8, 1.2))


def claim_due(
    sessions: sessionmaker[Session], *, limit: int, lease: float
) -> list[Claim]:
    """Lease up to `limit` due events whose contact has an email."""
    now = utcnow()
    query = (
        select(Event.id, Event.name, Event.data, Contact.email)
        .join(Contact, Contact.id == Event.contact_id)
        .where(
            Event.status == "pending",
            Event.next_attempt_at <= now,
            or_(Event.lease_until.is_(None), Event.lease_until < now),
            Contact.email.is_not(None),
        )
        .order_by(Event.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=Event)
    )
    with sessions.begin() as session:
        rows = session.execute(query).all()
        ids = [row.id for row in rows]
        if ids:
            session.execute(
                update(Event)
                .where(Event.id.in_(ids))
                .values(lease_until=now + timedelta(seconds=lease))
            )
    return [Claim(row.id, row.name, row.data, row.email) for row in rows]


def record_result(
    sessions: sessionmaker[Session], claim: Claim, result: DeliveryResult
) -> None:
    """Store the outcome of one attempt and release the lease."""
    now = utcnow()
    with sessions.begin() as session:
        event = session.get(Event, claim.event_id)
        if event is None:
            return
        event.attempts += 1
        event.lease_until = None
        event.last_error = None if result.outcome == "delivered" else result.message

        if result.outcome == "delivered":
            event.status = "delivered"
            event.delivered_at = now
        elif result.outcome == "refused":
            event.status = "dead"
        else:
            event.next_attempt_at = result.retry_at or now + backoff(event.attempts)


def release(sessions: sessionmaker[Session], claims: list[Claim]) -> None:
    """Give back leases not tried, so they need not wait for expiry."""
    if not claims:
        return
    with sessions.begin() as session:
        session.execute(
            update(Event)
            .where(Event.id.in_([claim.event_id for claim in claims]))
            .values(lease_until=None)
        )


class DeliveryWorker:
    """Delivers the outbox to AC until told to stop."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], client: ACClient
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._client = client
        self._paused_until: datetime | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver in rounds until `stop` is set."""
        if not self._settings.delivery_configured:
            logger.warning(
                "Event delivery to AC is paused: MAPPER_AC_ACTID and "
                "MAPPER_AC_EVENT_KEY are not set. Events are kept until they are."
            )
            return
        while not stop.is_set():
            try:
                delivered = await self.deliver_round()
            except Exception:
                logger.exception("Delivery round failed; trying again shortly.")
                delivered = 0
            if delivered == 0:
                await _wait(stop, self._idle_time())

    def _idle_time(self) -> float:
        interval = self._settings.delivery_interval
        if self._paused_until is None:
            return interval
        return max((self._paused_until - utcnow()).total_seconds(), interval)

    async def deliver_round(self) -> int:
        """Try one batch of due events; return how many were attempted."""
        if self._paused_until is not None and utcnow() < self._paused_until:
            return 0
        self._paused_until = None
        settings = self._settings
        claims = await run_in_threadpool(
            claim_due,
            self._sessions,
            limit=settings.delivery_batch_size,
            lease=settings.delivery_lease,
        )
        for index, claim in enumerate(claims):
            result = await self._client.send_event(
                email=claim.email, name=claim.name, data=claim.data
            )
            await run_in_threadpool(record_result, self._sessions, claim, result)
            if result.outcome == "retry":
                # AC is down or rate limiting: stop this batch rather than
                # push the rest of it at a server that is not taking events.
                self._paused_until = result.retry_at or utcnow() + backoff(1)
                await run_in_threadpool(release, self._sessions, claims[index + 1 :])
                return index + 1
            if result.outcome == "refused":
                logger.warning(
                    "AC refused event %d; it is marked dead.", claim.event_id
                )
        return len(claims)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
