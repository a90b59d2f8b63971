"""The email-link landing: `GET /go?h=<AC hash>&to=<page>`.

The hash identifies the contact; it is looked up here (locally first, AC
once on a miss) and dropped before the redirect, so it never reaches the
site's pages, logs, analytics or referrers. Every answer looks the same
whether or not the hash is known.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import SplitResult, unquote_plus, urlsplit, urlunsplit

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from mapper.clients import LookedUpContact
from mapper.errors import ACUnavailable
from mapper.models import Contact, Source, utcnow
from mapper.settings import Settings
from mapper.store import (
    ContactFacts,
    find_contact_by_hash,
    held_since,
    identify_visitor,
    record_contact,
    run_transaction,
    touch_visitor,
)
from mapper.tokens import VisitorId
from mapper.web import (
    Runtime,
    get_runtime,
    read_visitor_cookie,
    set_visitor_cookie,
)

logger = logging.getLogger(__name__)

AC_HASH = re.compile(r"[0-9a-f]{32}")
MAX_TARGET_LENGTH = 2048

LANDED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Welcome</title></head>
<body><p>Thanks for visiting. You can close this page.</p></body></html>
"""


async def go(request: Request) -> Response:
    """Identify the visitor by the link's hash and send it on, hash removed."""
    state = get_runtime(request)
    given = request.query_params.get("h", "").strip().lower()
    ac_hash = given if AC_HASH.fullmatch(given) else None
    target = choose_target(
        request.query_params.get("to"), settings=state.settings, ac_hash=ac_hash
    )

    cookie = read_visitor_cookie(request)
    visitor_id, identified = await _land(
        state, cookie.id if cookie else None, ac_hash=ac_hash
    )
    if ac_hash is not None and not identified:
        # AC is asked outside the transaction, so no lock waits on it.
        looked_up = await _look_up(state, ac_hash)
        if looked_up is not None:
            visitor_id, _ = await _land(
                state, visitor_id, ac_hash=ac_hash, looked_up=looked_up
            )

    response = RedirectResponse(target, status_code=302)
    response.headers["Referrer-Policy"] = "no-referrer"
    set_visitor_cookie(response, state, visitor=visitor_id)
    return response


async def _look_up(state: Runtime, ac_hash: str) -> LookedUpContact | None:
    """Ask AC about a hash mapper does not hold, unless AC denied it lately."""
    if ac_hash in state.unknown_hashes:
        return None

    try:
        looked_up = await state.ac.view_hash(ac_hash)
    except ACUnavailable:
        # The visitor goes on anonymous; the next click asks again.
        logger.warning("AC hash lookup failed; the visitor stays anonymous.")
        return None
    if looked_up is None:
        state.unknown_hashes.add(ac_hash)
    return looked_up


async def _land(
    state: Runtime,
    visitor_id: VisitorId | None,
    *,
    ac_hash: str | None,
    looked_up: LookedUpContact | None = None,
) -> tuple[VisitorId, bool]:
    """Store what AC said, then bind the visitor if the hash is known.

    Returns the visitor's id and whether it is now bound to the contact.
    """

    def land(session: Session) -> tuple[VisitorId, bool]:
        visitor = touch_visitor(session, visitor_id)
        if looked_up is not None:
            record_contact(session, _facts(looked_up))

        contact: Contact | None = None
        if ac_hash is not None:
            contact = find_contact_by_hash(session, ac_hash)
        if contact is not None:
            identify_visitor(
                session,
                visitor,
                contact,
                how=Source.HASH,
                held_since=held_since(state.settings.held_event_ttl),
            )
        return VisitorId(visitor.public_id), contact is not None

    return await run_in_threadpool(run_transaction, state.sessions, land)


def _facts(found: LookedUpContact) -> ContactFacts:
    # AC's answer is its current state, so it is dated now: a webhook that
    # was sent before the lookup but arrives after it cannot undo it.
    return ContactFacts(
        ac_contact_id=found.ac_contact_id,
        email=found.email,
        as_of=utcnow(),
        source=Source.HASH,
        ac_hash=found.ac_hash,
    )


def choose_target(raw: str | None, *, settings: Settings, ac_hash: str | None) -> str:
    """Return `raw` if it is an http(s) URL on an allowed host, else a default.

    Query parameters and a fragment that carry the hash are removed, so a
    link built carelessly still cannot pass it on to the page; a target
    with the hash in its path is not used at all.
    """
    if not raw or len(raw) > MAX_TARGET_LENGTH or not raw.isprintable():
        return choose_default_target(settings)
    parts = _split_allowed(raw, settings)
    if parts is None:
        return choose_default_target(settings)
    if ac_hash is None or not _carries(raw, ac_hash):
        return raw

    if _carries(parts.path, ac_hash):
        return choose_default_target(settings)
    # Only the pieces holding the hash go; the rest stays byte for byte.
    pieces = parts.query.split("&")
    query = "&".join(piece for piece in pieces if not _carries(piece, ac_hash))
    fragment = "" if _carries(parts.fragment, ac_hash) else parts.fragment
    return urlunsplit(parts._replace(query=query, fragment=fragment))


def _carries(text: str, ac_hash: str) -> bool:
    # Percent-escapes are undone first, so an escaped digit hides nothing.
    return ac_hash in unquote_plus(text).lower()


def _split_allowed(raw: str, settings: Settings) -> SplitResult | None:
    """Split `raw` if it is a plain http(s) URL on an allowed host."""
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        return None

    allowed = parts.scheme in {"http", "https"} and (
        (parts.hostname or "") in settings.allowed_hosts
    )
    # Userinfo would pass whatever it holds to the site as credentials.
    plain = "@" not in parts.netloc and "\\" not in parts.netloc
    return parts if allowed and plain else None


def choose_default_target(settings: Settings) -> str:
    """Where a link goes whose target is missing or not allowed.

    That is the configured page, else the first allowed site, else
    mapper's own neutral page.
    """
    if settings.default_redirect:
        return settings.default_redirect
    if settings.allowed_hosts:
        return f"https://{settings.allowed_hosts[0]}/"
    return "/landed"


async def landed(request: Request) -> HTMLResponse:
    """The neutral page for links with nowhere else to go."""
    return HTMLResponse(LANDED_PAGE)
