"""What the HTTP endpoints share: the runtime, bounded bodies, the cookie.

The visitor cookie carries only a signed random id; see `mapper.tokens`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import Response

from mapper.batching import WriteBatcher
from mapper.clients import ACClient
from mapper.errors import BadRequest
from mapper.metrics import Metrics
from mapper.models import utcnow
from mapper.settings import Settings
from mapper.store import NewEvent, StoredEvent
from mapper.tokens import SignedVisitor, VisitorId, VisitorSigner

UNKNOWN_HASH_TTL = 600.0
UNKNOWN_HASH_LIMIT = 10_000
# Seconds after which `/track` signs a good cookie again.
COOKIE_RENEWAL = 86400.0


class UnknownHashes:
    """Hashes AC recently said it does not know, kept for a while.

    A link clicked again with a hash AC does not know costs no second AC
    call. The oldest entries make room for new ones.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def __contains__(self, ac_hash: str) -> bool:
        return self._until.get(ac_hash, 0.0) > time.monotonic()

    def add(self, ac_hash: str) -> None:
        # Re-inserting moves the hash to the end, which is the newest.
        self._until.pop(ac_hash, None)
        while len(self._until) >= UNKNOWN_HASH_LIMIT:
            del self._until[next(iter(self._until))]
        self._until[ac_hash] = time.monotonic() + UNKNOWN_HASH_TTL


@dataclass
class Runtime:
    """The long-lived objects one app instance works with."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    signer: VisitorSigner
    intake: WriteBatcher[NewEvent, StoredEvent]
    ac: ACClient
    metrics: Metrics
    unknown_hashes: UnknownHashes = field(default_factory=UnknownHashes)


def get_runtime(request: Request) -> Runtime:
    found = request.app.state.runtime
    assert isinstance(found, Runtime)
    return found


async def read_body(request: Request, *, limit: int) -> bytes:
    """Read the request body, refusing with 413 once it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)

    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> BadRequest:
    return BadRequest(f"Expected a body of at most {limit} bytes.", status=413)


def read_media_type(request: Request) -> str:
    """The request's content type without parameters, lowercased."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def read_visitor_cookie(request: Request) -> SignedVisitor | None:
    """The visitor from a good cookie, or None for a new anonymous visitor."""
    state = get_runtime(request)
    return state.signer.read(request.cookies.get(state.settings.cookie_name))


def is_cookie_fresh(
    cookie: SignedVisitor | None, state: Runtime, *, visitor: VisitorId
) -> bool:
    """Whether the browser's cookie names `visitor` and was signed lately.

    Then signing it again would change nothing that matters. Signing costs
    a good part of an event's intake; a day, or a tenth of the cookie's
    lifetime if that is less, is lost in the lifetime.
    """
    if cookie is None or cookie.id != visitor:
        return False
    renew_after = min(COOKIE_RENEWAL, state.settings.cookie_max_age / 10)
    return (utcnow() - cookie.signed_at).total_seconds() < renew_after


def set_visitor_cookie(
    response: Response, state: Runtime, *, visitor: VisitorId
) -> None:
    """Give the browser a freshly signed cookie, which restarts its lifetime."""
    settings = state.settings
    response.set_cookie(
        settings.cookie_name,
        state.signer.sign(visitor),
        max_age=settings.cookie_max_age,
        path="/",
        secure=settings.cookie_secure,
        httponly=True,
        samesite="lax",
    )
    # A response that sets a visitor cookie is never shared by a cache.
    response.headers["Cache-Control"] = "no-store"
