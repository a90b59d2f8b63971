"""The delivery loop: takes due events from the outbox and posts them to AC.

Each event's email is read from `contacts` at delivery time, so an address
changed by a webhook after the event was tracked is the one AC receives.
No AC contact lookup happens here.

What it promises: an accepted event is delivered, or dead with a reason,
never dropped (except held events whose visitor was not identified in
time); a visitor's events reach AC in the order they were received; and
an event is sent twice only when a worker died while it was in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prometheus_client import start_http_server
from sqlalchemy import Engine, delete, exists, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker
from starlette.concurrency import run_in_threadpool

from mapper.batching import WriteBatcher
from mapper.clients import ACClient, DeliveryResult, Outcome
from mapper.db import make_sessionmaker
from mapper.errors import SettingsError, describe_exception
from mapper.metrics import Metrics
from mapper.models import Contact, DeadReason, Event, EventStatus, utcnow
from mapper.settings import LEASE_MARGIN, Settings
from mapper.store import held_since

logger = logging.getLogger(__name__)

BACKOFF_BASE = 2.0
# Held events past their time are looked for this often.
SWEEP_INTERVAL = 60.0


@dataclass(frozen=True)
class Claim:
    """An event leased to this worker for one delivery attempt."""

    event_id: int
    name: str
    data: str | None
    email: str = field(repr=False)
    lease_token: str = field(repr=False)
    lease_until: datetime


def compute_backoff(attempts: int, *, maximum: float) -> timedelta:
    """How long to wait after the `attempts`-th failure, with jitter.

    The jitter spreads retries out, so that a backlog does not return to AC
    all at once after an outage.
    """
    delay = min(BACKOFF_BASE ** min(attempts, 16), maximum)
    return timedelta(seconds=delay * random.uniform(0.8, 1.2))


def retry_time(result: DeliveryResult, *, attempts: int, maximum: float) -> datetime:
    """When to try again after a failure, never sooner than the backoff.

    AC's Retry-After counts when it is later, so that "retry now" cannot
    make a hot loop.
    """
    earliest = utcnow() + compute_backoff(attempts, maximum=maximum)
    if result.retry_at is None:
        return earliest
    return max(result.retry_at, earliest)


def claim_due(
    sessions: sessionmaker[Session], *, limit: int, lease: float
) -> list[Claim]:
    """Lease up to `limit` due events whose contact has an email.

    Only a visitor's oldest pending event can be claimed, so each visitor's
    events reach AC in the order they were received, one at a time. Rows
    locked by another worker are skipped, not waited for, and each claimed
    row gets this batch's token, so two workers never hold one.
    """
    now = utcnow()
    token = secrets.token_hex(16)
    # Only the lease holder moves an event out of pending, so an event
    # behind another stays behind it whatever other workers are doing.
    earlier = aliased(Event)
    behind_another = exists().where(
        earlier.visitor_id == Event.visitor_id,
        earlier.status == EventStatus.PENDING,
        earlier.id < Event.id,
    )
    query = (
        select(Event.id, Event.name, Event.data, Contact.email)
        .join(Contact, Contact.id == Event.contact_id)
        .where(
            Event.status == EventStatus.PENDING,
            Event.next_attempt_at <= now,
            or_(Event.lease_until.is_(None), Event.lease_until < now),
            Contact.email.is_not(None),
            ~behind_another,
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


@dataclass(frozen=True)
class Recorded:
    """What one attempt did to its event, for the metrics."""

    status: EventStatus
    received_at: datetime


@dataclass(frozen=True)
class Attempt:
    """One send of a claimed event, and what AC answered."""

    claim: Claim
    result: DeliveryResult


def record_result(
    session: Session, attempt: Attempt, *, settings: Settings
) -> Recorded | None:
    """Store the outcome of one attempt and release the lease.

    Nothing is written, and None returned, if the lease was lost (it
    expired and another worker took the event), so that a late answer
    cannot undo that worker's outcome.
    """
    now = utcnow()
    claim, result = attempt.claim, attempt.result
    event = session.get(Event, claim.event_id, with_for_update=True)
    if event is None or event.lease_token != claim.lease_token:
        return None

    event.attempts += 1
    event.lease_until = event.lease_token = None
    if result.outcome is Outcome.DELIVERED:
        event.status = EventStatus.DELIVERED
        event.delivered_at = now
        event.last_error = None
    elif result.outcome is Outcome.REFUSED:
        event.last_error = result.message
        _count_refusal(event, settings)
    elif result.outcome is Outcome.MISCONFIGURED:
        # No fault of the event: it stays first in line, for the worker
        # to try again once its pause is over.
        event.last_error = result.message
        event.next_attempt_at = now
    else:
        # AC down or limiting is no fault of the event either, so it is
        # never made dead for it; but it backs off on its own too, so
        # that an event that keeps failing while others go through
        # costs little.
        event.last_error = result.message
        event.next_attempt_at = retry_time(
            result, attempts=event.attempts, maximum=settings.delivery_backoff_max
        )
    return Recorded(EventStatus(event.status), event.received_at)


def _count_refusal(event: Event, settings: Settings) -> None:
    """Back the event off, or give up on it once AC refused it often enough."""
    event.refusals += 1
    if event.refusals >= settings.delivery_max_refusals:
        event.status = EventStatus.DEAD
        event.dead_reason = DeadReason.REFUSED
    backoff = compute_backoff(event.refusals, maximum=settings.delivery_backoff_max)
    event.next_attempt_at = utcnow() + backoff


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


def expire_held(sessions: sessionmaker[Session], *, ttl: int) -> int:
    """Delete held events older than `ttl` seconds; return how many."""
    expired = Event.received_at < held_since(ttl)
    with sessions.begin() as session:
        result = session.execute(
            delete(Event).where(Event.status == EventStatus.HELD, expired)
        )
    return int(result.rowcount)  # type: ignore[attr-defined]


class DeliveryWorker:
    """Delivers the outbox to AC until told to stop.

    Up to `delivery_concurrency` sends are in flight at once, each for a
    different visitor. A failure that is AC's (down, limiting) pauses the
    whole worker with growing backoff; a refusal of the account settings
    stops it, trying one event again now and then.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sessions: sessionmaker[Session],
        client: ACClient,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._client = client
        self._metrics = metrics
        # Sends that end together store their outcomes in one transaction.
        self._outcomes = WriteBatcher(sessions, self._record)
        self._stop = asyncio.Event()
        self._failures = 0
        self._misconfigured = False
        self._next_sweep = 0.0
        self.paused_until: datetime | None = None

    def _record(
        self, session: Session, attempts: list[Attempt]
    ) -> list[Recorded | None]:
        return [
            record_result(session, attempt, settings=self._settings)
            for attempt in attempts
        ]

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

        while not stop.is_set():
            attempted = 0
            try:
                await self._sweep_if_due()
                if not missing:
                    attempted = await self.deliver_round()
            except Exception as exc:
                # Only the type and place: a database error's text can
                # quote the row it failed on. Rounds back off like sends.
                logger.warning("Delivery round failed (%s).", describe_exception(exc))
                self._failures += 1
                self.paused_until = utcnow() + compute_backoff(
                    self._failures, maximum=self._settings.delivery_backoff_max
                )
            if attempted == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._idle_seconds())

    async def _sweep_if_due(self) -> None:
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        expired = await run_in_threadpool(
            expire_held, self._sessions, ttl=self._settings.held_event_ttl
        )
        if expired:
            self._metrics.held_expired.inc(expired)
            logger.info(
                "Dropped %d held events whose visitor was not identified in time.",
                expired,
            )

    def _idle_seconds(self) -> float:
        interval = self._settings.delivery_interval
        if self.paused_until is None:
            return interval
        return max((self.paused_until - utcnow()).total_seconds(), interval)

    def _is_paused(self) -> bool:
        return self.paused_until is not None and utcnow() < self.paused_until

    async def deliver_round(self) -> int:
        """Try one batch of due events; return how many were attempted."""
        if self._is_paused():
            return 0
        self.paused_until = None

        # While AC refuses the settings, one event at a time tests them.
        limit = 1 if self._misconfigured else self._settings.delivery_batch_size
        claims = await run_in_threadpool(
            claim_due, self._sessions, limit=limit, lease=self._settings.delivery_lease
        )
        started: set[int] = set()
        slots = asyncio.Semaphore(self._settings.delivery_concurrency)
        try:
            async with asyncio.TaskGroup() as group:
                for claim in claims:
                    group.create_task(self._deliver_claim(claim, slots, started))
        finally:
            # A claim that may have reached AC is never released early,
            # only left to its lease.
            untried = [claim for claim in claims if claim.event_id not in started]
            await run_in_threadpool(release, self._sessions, untried)
        return len(started)

    async def _deliver_claim(
        self, claim: Claim, slots: asyncio.Semaphore, started: set[int]
    ) -> None:
        async with slots:
            # Checked again after the turn: the wait may have used up the
            # lease, or another send may have paused the worker.
            if not self._may_send(claim):
                return
            await self._client.take_turn()
            if not self._may_send(claim):
                return
            started.add(claim.event_id)
            try:
                await self._deliver(claim)
            except Exception as exc:
                # Other sends are in flight: failing the round would lose
                # their answers and send them again. This one is left to
                # its lease.
                logger.warning(
                    "Storing a delivery outcome failed (%s).", describe_exception(exc)
                )

    def _may_send(self, claim: Claim) -> bool:
        # A send must end, and its outcome be stored, while the lease holds,
        # or another worker could take the event and send it too; a stopping
        # or paused worker starts no send.
        seconds = self._settings.ac_timeout + LEASE_MARGIN
        deadline = utcnow() + timedelta(seconds=seconds)
        stopped = self._stop.is_set() or self._is_paused()
        return not stopped and deadline < claim.lease_until

    async def _deliver(self, claim: Claim) -> None:
        """Send one event, store the outcome, and react to AC's answer."""
        result = await self._client.send_event(
            email=claim.email, name=claim.name, data=claim.data
        )
        recorded = await self._outcomes.submit(Attempt(claim, result))
        self._count(result, recorded)

        if result.outcome is Outcome.DELIVERED:
            self._resume()
        elif result.outcome is Outcome.REFUSED:
            # AC's own message stays in the database; it may quote the event.
            # The worker goes on: other events may well be taken.
            dead = recorded is not None and recorded.status is EventStatus.DEAD
            logger.warning(
                "AC refused event %d; %s.",
                claim.event_id,
                "it is dead now" if dead else "it will be tried again",
            )
        else:
            self._pause(result)

    def _count(self, result: DeliveryResult, recorded: Recorded | None) -> None:
        if recorded is None:
            return
        if recorded.status is EventStatus.DELIVERED:
            self._metrics.delivered.inc()
            waited = (utcnow() - recorded.received_at).total_seconds()
            self._metrics.latency.observe(max(waited, 0.0))
        elif recorded.status is EventStatus.DEAD:
            self._metrics.dead.inc()
        else:
            self._metrics.retried.labels(outcome=result.outcome.value).inc()

    def _resume(self) -> None:
        if self._failures or self._misconfigured:
            logger.info("AC is taking events again; delivery resumes.")
        self._failures = 0
        self._misconfigured = False

    def _pause(self, result: DeliveryResult) -> None:
        maximum = self._settings.delivery_backoff_max
        if result.outcome is Outcome.MISCONFIGURED:
            # No retry of any event can help until the settings are fixed, so
            # one event is tried again only after the longest pause.
            self.paused_until = utcnow() + timedelta(seconds=maximum)
            if not self._misconfigured:
                logger.error(
                    "AC refused the event tracking settings "
                    "(MAPPER_AC_ACTID, MAPPER_AC_EVENT_KEY, MAPPER_AC_TRACK_URL); "
                    "delivery is stopped and events are kept. Fix them and "
                    "restart, or mapper tries one event again in %g seconds.",
                    maximum,
                )
            self._misconfigured = True
            return

        if self._is_paused():
            # Sends in flight together fail together: that is one failure
            # of AC, not one step of backoff each. Only a later
            # Retry-After still counts.
            assert self.paused_until is not None
            if result.retry_at is not None:
                self.paused_until = max(self.paused_until, result.retry_at)
            return

        # AC is down or rate limiting: pause, for longer after each failure
        # in a row, rather than push the rest of the outbox at it.
        self._failures += 1
        self.paused_until = retry_time(result, attempts=self._failures, maximum=maximum)
        if self._failures == 1:
            logger.warning("AC is not taking events (%s); pausing.", result.message)


async def run_alone(
    settings: Settings, engine: Engine, *, metrics_port: int | None
) -> None:
    """Run the delivery loop as a process of its own, as `mapper worker`.

    SIGTERM and SIGINT stop it once in-flight sends have been stored; the
    engine is disposed of on the way out.
    With `metrics_port`, its metrics are served on that port of MAPPER_HOST.
    """
    sessions = make_sessionmaker(engine)
    metrics = Metrics(sessions)
    server = None
    if metrics_port is not None:
        try:
            server, _ = start_http_server(
                metrics_port, addr=settings.host, registry=metrics.registry
            )
        except OSError as exc:
            engine.dispose()
            raise SettingsError(
                f"Cannot serve metrics on MAPPER_HOST, port {metrics_port} "
                f"({exc.strerror})."
            ) from None
        logger.info("Serving /metrics on %s:%d.", settings.host, metrics_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    client = ACClient(settings)
    worker = DeliveryWorker(settings, sessions=sessions, client=client, metrics=metrics)
    try:
        await worker.run(stop)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        await client.aclose()
        engine.dispose()
    logger.info("mapper worker has stopped.")
