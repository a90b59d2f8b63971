"""The delivery loop: takes due events from the outbox and posts them to AC.

Each event's email is read from `contacts` at delivery time, so an address
changed by a webhook after the event was tracked is the one AC receives.
No AC contact lookup happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from mapper.clients import ACClient, DeliveryResult, Outcome
from mapper.errors import describe_exception
from mapper.models import Contact, Event, EventStatus, utcnow
from mapper.settings import LEASE_MARGIN, Settings

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
    lease_token: str
    lease_until: datetime


def compute_backoff(attempts: int) -> timedelta:
    """How long to wait after the `attempts`-th failure, with jitter.

    The jitter spreads retries out, so that a backlog does not return to AC
    all at once after an outage.
    """
    delay = min(BACKOFF_BASE ** min(attempts, 16), BACKOFF_MAX)
    return timedelta(seconds=delay * random.uniform(0.8, 1.2))


def retry_time(result: DeliveryResult, *, attempts: int) -> datetime:
    """When to try again after a failure: AC's Retry-After if it is later
    than the backoff, so that "retry now" cannot make a hot loop."""
    earliest = utcnow() + compute_backoff(attempts)
    if result.retry_at is None:
        return earliest
    return max(result.retry_at, earliest)


def claim_due(
    sessions: sessionmaker[Session], *, limit: int, lease: float
) -> list[Claim]:
    """Lease up to `limit` due events whose contact has an email.

    Rows locked by another worker are skipped, not waited for, and each
    claimed row gets this batch's token, so two workers never hold one.
    """
    now = utcnow()
    token = secrets.token_hex(16)
    query = (
        select(Event.id, Event.name, Event.data, Contact.email)
        .join(Contact, Contact.id == Event.contact_id)
        .where(
            Event.status == EventStatus.PENDING,
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
        # Timed from after the lock wait, so the lease is never shorter
        # than this worker believes.
        lease_until = utcnow() + timedelta(seconds=lease)
        if rows:
            session.execute(
                update(Event)
                .where(Event.id.in_([row.id for row in rows]))
                .values(lease_until=lease_until, lease_token=token)
            )
    return [
        Claim(row.id, row.name, row.data, row.email, token, lease_until) for row in rows
    ]


def record_result(
    sessions: sessionmaker[Session], *, claim: Claim, result: DeliveryResult
) -> None:
    """Store the outcome of one attempt and release the lease.

    Nothing is written if the lease was lost (it expired and another worker
    took the event), so a late answer cannot undo that worker's outcome.
    """
    now = utcnow()
    with sessions.begin() as session:
        event = session.get(Event, claim.event_id, with_for_update=True)
        if event is None or event.lease_token != claim.lease_token:
            return

        event.attempts += 1
        event.lease_until = event.lease_token = None
        if result.outcome is Outcome.DELIVERED:
            event.status = EventStatus.DELIVERED
            event.delivered_at = now
            event.last_error = None
            return

        # A refusal is kept for another try like any failure: AC's answers
        # do not say whether the event or the account settings were wrong.
        # TODO(#3): tell account-level refusals from ones about the event,
        # and give up on an event after a bounded number of attempts; remove
        # when delivery stops per account on a configuration refusal.
        event.last_error = result.message
        event.next_attempt_at = retry_time(result, attempts=event.attempts)


def release(sessions: sessionmaker[Session], claims: list[Claim]) -> None:
    """Give back leases not tried, so they need not wait for expiry."""
    if not claims:
        return
    with sessions.begin() as session:
        session.execute(
            update(Event)
            .where(
                Event.id.in_([claim.event_id for claim in claims]),
                Event.lease_token == claims[0].lease_token,
            )
            .values(lease_until=None, lease_token=None)
        )


class DeliveryWorker:
    """Delivers the outbox to AC until told to stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        sessions: sessionmaker[Session],
        client: ACClient,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._client = client
        self._stop = asyncio.Event()
        self._failures = 0
        self.paused_until: datetime | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver in rounds until `stop` is set."""
        self._stop = stop
        missing = self._settings.missing_delivery_settings
        if missing:
            logger.warning(
                "Event delivery to AC is paused until %s %s set; "
                "events are kept until then.",
                " and ".join(missing),
                "is" if len(missing) == 1 else "are",
            )
            return

        while not stop.is_set():
            try:
                attempted = await self.deliver_round()
            except Exception as exc:
                # Only the type and place: a database error's text can
                # quote the row it failed on. Rounds back off like sends.
                logger.warning("Delivery round failed (%s).", describe_exception(exc))
                self._failures += 1
                self.paused_until = utcnow() + compute_backoff(self._failures)
                attempted = 0
            if attempted == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._idle_seconds())

    def _idle_seconds(self) -> float:
        interval = self._settings.delivery_interval
        if self.paused_until is None:
            return interval
        return max((self.paused_until - utcnow()).total_seconds(), interval)

    async def deliver_round(self) -> int:
        """Try one batch of due events; return how many were attempted."""
        if self.paused_until is not None and utcnow() < self.paused_until:
            return 0
        self.paused_until = None

        claims = await run_in_threadpool(
            claim_due,
            self._sessions,
            limit=self._settings.delivery_batch_size,
            lease=self._settings.delivery_lease,
        )
        attempted = 0
        try:
            for claim in claims:
                if not self._may_send(claim):
                    break
                # Counted before the send: a claim that may have reached AC
                # is never released early, only left to its lease.
                attempted += 1
                if await self._deliver(claim) is not Outcome.DELIVERED:
                    break
        finally:
            await run_in_threadpool(release, self._sessions, claims[attempted:])
        return attempted

    def _may_send(self, claim: Claim) -> bool:
        # A send must end, and its outcome be stored, while the lease holds,
        # or another worker could take the event and send it too; a stopping
        # worker starts no send.
        seconds = self._settings.ac_timeout + LEASE_MARGIN
        deadline = utcnow() + timedelta(seconds=seconds)
        return not self._stop.is_set() and deadline < claim.lease_until

    async def _deliver(self, claim: Claim) -> Outcome:
        result = await self._client.send_event(
            email=claim.email, name=claim.name, data=claim.data
        )
        await run_in_threadpool(
            record_result, self._sessions, claim=claim, result=result
        )

        if result.outcome is Outcome.DELIVERED:
            if self._failures:
                logger.info("AC is taking events again; delivery resumes.")
            self._failures = 0
            return result.outcome

        # AC is down, rate limiting or refusing: pause, for longer after each
        # failure in a row, rather than push the rest of the outbox at it.
        self._failures += 1
        self.paused_until = retry_time(result, attempts=self._failures)
        if result.outcome is Outcome.REFUSED:
            # AC's own message stays in the database; it may quote the event.
            logger.warning("AC refused event %d; it will be retried.", claim.event_id)
        elif self._failures == 1:
            logger.warning("AC is not taking events (%s); pausing.", result.message)
        return result.outcome
