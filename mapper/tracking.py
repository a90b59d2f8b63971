"""Event intake: `POST /track` from the browser, stored in the outbox.

The browser sends only an event name, its data and an optional client id;
who the visitor is comes from the signed cookie. The answer is 202 once
the event is committed, without waiting for AC. An event's data is stored
and sent to AC as the page gave it, so it holds whatever the site put in.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import JSONResponse

from mapper.batching import WriteBatcher
from mapper.errors import BadRequest
from mapper.settings import Settings
from mapper.store import (
    HoldLimit,
    Intake,
    NewEvent,
    StoredEvent,
    add_events,
    held_since,
)
from mapper.tokens import VisitorId
from mapper.web import (
    Runtime,
    get_runtime,
    is_cookie_fresh,
    read_body,
    read_media_type,
    read_visitor_cookie,
    set_visitor_cookie,
)

MAX_EVENT_NAME = 32
# AC documents only the length limit. Integrations keep names to letters,
# digits, space, dash and underscore, so mapper accepts no more than that.
EVENT_NAME = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9 _-]*[A-Za-z0-9_-])?")
# Deeper than any real event's data, and far below Python's recursion limit.
MAX_DATA_DEPTH = 32
CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Of the types a page may send cross-origin without a preflight, only
# text/plain can carry JSON, and it is what sendBeacon sends.
BODY_TYPES = {"application/json", "text/plain"}


@dataclass(frozen=True)
class TrackedEvent:
    """A checked event, ready for the outbox; independent of the HTTP shape."""

    name: str
    data: str | None
    client_id: str | None


async def track(request: Request) -> JSONResponse:
    """Accept one event for the cookie's visitor and queue it for AC."""
    state = get_runtime(request)
    check_origin(request, state)
    if read_media_type(request) not in BODY_TYPES:
        raise BadRequest(
            "Expected a JSON body (application/json or text/plain).", status=415
        )
    body = await read_body(request, limit=state.settings.track_max_bytes)
    event = parse_event(body)

    cookie = read_visitor_cookie(request)
    visitor_id = await accept_event(
        state, visitor=cookie.id if cookie else None, event=event
    )
    response = JSONResponse({"accepted": True}, status_code=202)
    if not is_cookie_fresh(cookie, state, visitor=visitor_id):
        set_visitor_cookie(response, state, visitor=visitor_id)
    return response


def check_origin(request: Request, state: Runtime) -> None:
    """Refuse a browser request sent from a page on a foreign origin.

    CORS only hides the answer from such a page; a beacon would still be
    stored, so the check is made here as well.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return
    own = f"{request.url.scheme}://{request.url.netloc}".lower()
    if origin.lower() != own and origin.lower() not in state.settings.allowed_origins:
        raise BadRequest(
            "Expected a request from an origin in MAPPER_ALLOWED_ORIGINS.", status=403
        )


def parse_event(body: bytes) -> TrackedEvent:
    """Check a `/track` body; raise `BadRequest` naming the bad field."""
    try:
        payload = json.loads(
            body.decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_double_sized_int,
            object_pairs_hook=_unique_keys,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("Expected a UTF-8 JSON object.") from exc
    except RecursionError as exc:
        raise BadRequest("Expected JSON nested less deeply.") from exc
    if not isinstance(payload, dict):
        raise BadRequest("Expected a JSON object.")

    return TrackedEvent(
        name=_event_name(payload.get("event")),
        data=_event_data(payload.get("data")),
        client_id=_client_id(payload.get("id")),
    )


def _refuse_constant(name: str) -> None:
    raise BadRequest("Expected standard JSON, without NaN or Infinity.")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise BadRequest("Expected JSON numbers within the range of a double.")
    return number


def _double_sized_int(text: str) -> int:
    # Python's integers have no limit, but other JSON readers, AC's among
    # them, take numbers as doubles; and past 4,300 digits int() refuses.
    if not math.isfinite(float(text)):
        raise BadRequest("Expected JSON numbers within the range of a double.")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With a key given twice, which value the page meant is unclear.
    found = dict(pairs)
    if len(found) != len(pairs):
        raise BadRequest("Expected each JSON key at most once per object.")
    return found


def _event_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest('Expected "event" to be a non-empty string.', status=422)
    if len(value) > MAX_EVENT_NAME:
        raise BadRequest(
            f'Expected "event" of at most {MAX_EVENT_NAME} characters.', status=422
        )
    if not EVENT_NAME.fullmatch(value):
        raise BadRequest(
            'Expected "event" of letters, digits, spaces, "-" and "_".', status=422
        )
    return value


def _event_data(value: Any) -> str | None:
    # AC stores one string per event; any other JSON value is sent as its
    # JSON text.
    if value is None:
        return None
    text = value if isinstance(value, str) else _compact_json(value)
    # PostgreSQL text cannot hold NUL, and no HTTP form can carry a lone
    # surrogate; both are refused here rather than failing in the database.
    if "\x00" in text or not _is_unicode(text):
        raise BadRequest(
            'Expected "data" without NUL characters or lone surrogates.', status=422
        )
    return text


def _compact_json(value: Any) -> str:
    if _depth(value) > MAX_DATA_DEPTH:
        raise BadRequest(
            f'Expected "data" nested at most {MAX_DATA_DEPTH} deep.', status=422
        )
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _depth(value: Any) -> int:
    """How many arrays and objects lie inside one another in `value`."""
    # Walked without recursion, so that no input can exhaust the stack.
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, enclosing = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, enclosing + 1)
            stack.extend((child, enclosing + 1) for child in item)
    return deepest


def _is_unicode(text: str) -> bool:
    # JSON can carry "\ud800", a half of a character that no database or
    # HTTP form can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _client_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not CLIENT_ID.fullmatch(value):
        raise BadRequest(
            'Expected "id" of 1 to 64 letters, digits or ". _ : -".', status=422
        )
    return value


async def accept_event(
    state: Runtime, *, visitor: VisitorId | None, event: TrackedEvent
) -> VisitorId:
    """Store `event` for the visitor (new if unknown); return the visitor id.

    It returns once the event is committed. This is event intake
    independent of the HTTP shape: any other way of receiving events calls
    it too. Raises `BadRequest` (429) when the visitor is anonymous and
    holds as many events as it may.
    """
    stored = await state.intake.submit(
        NewEvent(visitor, event.name, event.data, event.client_id)
    )
    if stored.intake is Intake.HELD_FULL:
        most = state.settings.held_events_per_visitor
        raise BadRequest(
            f"Expected at most {most} held events from a visitor not yet "
            f"identified; it holds {most}.",
            status=429,
        )
    if stored.intake is Intake.STORED:
        state.metrics.accepted.inc()
    return stored.visitor


def make_intake(
    settings: Settings, sessions: sessionmaker[Session]
) -> WriteBatcher[NewEvent, StoredEvent]:
    """The writer that stores the events of concurrent requests together."""

    def store(session: Session, events: list[NewEvent]) -> list[StoredEvent]:
        hold = HoldLimit(
            settings.held_events_per_visitor, held_since(settings.held_event_ttl)
        )
        return add_events(session, events, hold=hold)

    return WriteBatcher(sessions, store)
