"""Outbound calls to ActiveCampaign: hash lookups and event posts.

These are the only places an email, the event key or the API token leave
the server, and they go only to AC. Nothing here logs a URL or a body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

import httpx

from mapper.emails import normalize_email
from mapper.errors import ACUnavailable, InvalidEmail
from mapper.settings import Settings

logger = logging.getLogger(__name__)

AC_ID = re.compile(r"[0-9]{1,20}")
MAX_MESSAGE = 500
# A Retry-After longer than this is taken as this: an hour's pause is the
# most a single answer may impose on the outbox.
MAX_RETRY_AFTER = 3600
# How long lookups pause after a 429 or 503 that names no time.
LOOKUP_PAUSE = 5.0
# AC answers at its limit with 429, and has been seen answering 503.
RATE_LIMITED = {429, 503}
# AC's only observed refusal text names the account ID; refusals naming it,
# the key or event tracking being off are taken as the settings being wrong,
# which no retry of this or any other event can fix.
ACCOUNT_PROBLEM = re.compile(
    r"account id|actid|\bkey\b|tracking is (?:disabled|not enabled|off)", re.I
)
ACCOUNT_STATUSES = {401, 403, 404}
# How much later than urgent callers background sends wake for a turn.
BACKGROUND_LAG = 0.005
# httpx's connection pool looks through all of its connections for every
# request it queues, so its cost grows with the square of its size: at 50
# connections it spends more time on that than on the sends. Event posts
# therefore go through several small pools, enough for
# MAPPER_DELIVERY_CONCURRENCY sends at once.
CONNECTIONS_PER_POOL = 8


@dataclass(frozen=True)
class LookedUpContact:
    """A contact as AC's hash lookup described it."""

    ac_contact_id: str
    email: str
    ac_hash: str


class Outcome(StrEnum):
    """What one event post came to."""

    DELIVERED = "delivered"
    RETRY = "retry"  # try again later, not before `retry_at` if AC said so
    REFUSED = "refused"  # AC will not take this event
    MISCONFIGURED = "misconfigured"  # AC will take no event with these settings


@dataclass(frozen=True)
class DeliveryResult:
    """How AC answered one event post, with AC's message."""

    outcome: Outcome
    message: str
    retry_at: datetime | None = None


class RateLimiter:
    """Keeps calls at least 1/`rate` seconds apart, within one event loop.

    Nobody books a moment ahead: waiters wake when the next call may go,
    and the first to run takes it. Urgent callers (a lookup that a
    redirect waits on) wake a little before background sends, so that a
    backlog of events cannot hold up a person clicking a link.
    """

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next_free = 0.0

    async def wait(self, *, urgent: bool = False) -> None:
        lag = 0.0 if urgent else BACKGROUND_LAG
        while True:
            now = time.monotonic()
            if now >= self._next_free:
                self._next_free = now + self._interval
                return
            await asyncio.sleep(self._next_free - now + lag)


class ACClient:
    """Talks to AC's v1 contact API and its event tracking endpoint.

    Lookups and event posts share one rate limit, since AC counts them
    against one account. After a 429 or 503, calls to that endpoint pause
    until AC's Retry-After has passed.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # Lookups are few, and keep httpx's own limits.
        self._http = _make_http_client(settings, limits=httpx.Limits())
        pools = math.ceil(settings.delivery_concurrency / CONNECTIONS_PER_POOL)
        pool_limits = httpx.Limits(
            max_connections=CONNECTIONS_PER_POOL,
            max_keepalive_connections=CONNECTIONS_PER_POOL,
        )
        self._event_pools = [
            _make_http_client(settings, limits=pool_limits) for _ in range(pools)
        ]
        self._posting = [0] * pools
        self._limiter = RateLimiter(settings.ac_rate_limit)
        self._lookups_paused_until: datetime | None = None
        self._events_paused_until: datetime | None = None

    async def take_turn(self) -> None:
        """Wait until an event post fits within the rate limit."""
        await self._limiter.wait()

    async def aclose(self) -> None:
        for client in [self._http, *self._event_pools]:
            await client.aclose()

    async def view_hash(self, ac_hash: str) -> LookedUpContact | None:
        """Ask AC which contact has `ac_hash`; None if AC knows no such one.

        The answer counts only if it is one contact carrying that same
        hash, so an odd reply cannot bind a visitor to the wrong person.
        Raises `ACUnavailable` when AC cannot be asked or does not answer
        in its documented form.
        """
        settings = self._settings
        if not settings.lookup_configured:
            return None
        if _still_paused(self._lookups_paused_until):
            raise ACUnavailable("AC asked for a pause in contact lookups.")

        params = {
            "api_action": "contact_view_hash",
            "api_key": str(settings.ac_api_key),
            "api_output": "json",
            "hash": ac_hash,
        }
        try:
            async with asyncio.timeout(settings.ac_timeout):
                await self._limiter.wait(urgent=True)
                response = await self._http.get(
                    f"{settings.ac_api_url}/admin/api.php", params=params
                )
            if response.status_code in RATE_LIMITED:
                self._lookups_paused_until = _pause_end(response)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError, TimeoutError):
            # The httpx error's text holds the request URL, API key included;
            # it must not travel on in a traceback.
            raise ACUnavailable("AC's contact API gave no usable answer.") from None

        return read_view_answer(body, ac_hash)

    async def send_event(
        self, *, email: str, name: str, data: str | None
    ) -> DeliveryResult:
        """Post one event to AC's tracking endpoint for the contact `email`.

        Takes no turn of the rate limit itself: the caller takes one with
        `take_turn` first, so that it can check it still has time to send.
        """
        settings = self._settings
        if _still_paused(self._events_paused_until):
            message = "Paused at AC's request."
            return DeliveryResult(Outcome.RETRY, message, self._events_paused_until)

        form = {
            "actid": settings.ac_actid or "",
            "key": str(settings.ac_event_key or ""),
            "event": name,
            "visit": json.dumps({"email": email}),
        }
        if data is not None:
            form["eventdata"] = data
        try:
            # httpx's timeout applies to each phase; this bounds the whole
            # send, which must end before the event's lease does.
            async with asyncio.timeout(settings.ac_timeout):
                response = await self._post_event(form)
        except (httpx.HTTPError, TimeoutError) as exc:
            return DeliveryResult(Outcome.RETRY, f"Network error: {type(exc).__name__}")

        result = read_track_answer(response)
        if response.status_code in RATE_LIMITED:
            self._events_paused_until = result.retry_at
        return result

    async def _post_event(self, form: dict[str, str]) -> httpx.Response:
        # The least busy pool takes the post, so that none waits for a
        # connection while another has one free.
        pool = min(range(len(self._event_pools)), key=self._posting.__getitem__)
        self._posting[pool] += 1
        try:
            client = self._event_pools[pool]
            return await client.post(self._settings.ac_track_url, data=form)
        finally:
            self._posting[pool] -= 1


def _make_http_client(settings: Settings, *, limits: httpx.Limits) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=settings.ac_timeout,
        limits=limits,
        follow_redirects=False,
        headers={"User-Agent": "mapper"},
    )


def _still_paused(until: datetime | None) -> bool:
    return until is not None and datetime.now(UTC) < until


def _pause_end(response: httpx.Response) -> datetime:
    named = parse_retry_after(response.headers.get("Retry-After"))
    return named or datetime.now(UTC) + timedelta(seconds=LOOKUP_PAUSE)


def read_view_answer(body: Any, ac_hash: str) -> LookedUpContact | None:
    """Read a `contact_view_hash` answer; None when AC knows no such contact.

    Raises `ACUnavailable` for an answer not in v1's documented envelope.
    """
    if not isinstance(body, dict) or "result_code" not in body:
        raise ACUnavailable("AC's contact API answered without a result code.")
    if str(body["result_code"]) != "1":
        # v1 answers a bad key with result code 0 as well; that is no news
        # about the hash, so it must not be remembered as unknown.
        if "authoriz" in str(body.get("result_message", "")).lower():
            logger.warning("AC refused MAPPER_AC_API_KEY for a hash lookup.")
            raise ACUnavailable("AC refused the API key.")
        return None
    contact_id, email, found_hash = body.get("id"), body.get("email"), body.get("hash")
    if not isinstance(contact_id, str | int) or not AC_ID.fullmatch(str(contact_id)):
        return None
    if not isinstance(found_hash, str) or found_hash.lower() != ac_hash:
        return None
    if not isinstance(email, str):
        return None
    try:
        normalized = normalize_email(email)
    except InvalidEmail:
        return None
    return LookedUpContact(str(contact_id), normalized, ac_hash)


def read_track_answer(response: httpx.Response) -> DeliveryResult:
    """Judge an event post by AC's answer: delivered, retry, or refused."""
    status = response.status_code
    if status == 429 or status >= 500:
        retry_at = parse_retry_after(response.headers.get("Retry-After"))
        return DeliveryResult(Outcome.RETRY, f"AC answered HTTP {status}.", retry_at)
    if status in ACCOUNT_STATUSES:
        # Whatever the body: a wrong track URL answers with a web page.
        return DeliveryResult(Outcome.MISCONFIGURED, f"AC answered HTTP {status}.")

    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        # An HTML page is a proxy or maintenance screen in front of AC, not
        # AC judging the event, so the event is kept for another try.
        return DeliveryResult(Outcome.RETRY, f"AC answered HTTP {status} without JSON.")

    message = str(body.get("message", ""))[:MAX_MESSAGE]
    # Only the documented success marker counts: an empty object, a string
    # "1" or a 2xx without it are not AC having spawned the event.
    success = body.get("success")
    if status == 200 and type(success) is int and success == 1:
        return DeliveryResult(Outcome.DELIVERED, message)

    message = message or f"AC answered HTTP {status}."
    if ACCOUNT_PROBLEM.search(message):
        return DeliveryResult(Outcome.MISCONFIGURED, message)
    return DeliveryResult(Outcome.REFUSED, message)


def parse_retry_after(value: str | None) -> datetime | None:
    """Read a Retry-After header given in seconds or as an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    now = datetime.now(UTC)
    latest = now + timedelta(seconds=MAX_RETRY_AFTER)
    if value.isascii() and value.isdigit():
        return now + timedelta(seconds=min(int(value), MAX_RETRY_AFTER))

    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return min(max(moment, now), latest)
