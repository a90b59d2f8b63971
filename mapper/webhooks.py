"""The AC webhook receiver, which keeps contacts and their emails current.

AC posts form bodies with bracketed keys (`contact[id]`, `contact[email]`)
and does not sign them, so the secret in the URL is the authentication.
AC delivers at least once and never retries, and it disables a webhook
that answers 410, so this endpoint is idempotent and never says 410.
"""

from __future__ import annotations

import hmac
import re
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from mapper.clients import AC_ID
from mapper.emails import normalize_email
from mapper.errors import BadRequest, InvalidEmail
from mapper.models import ContactStatus, Source, utcnow
from mapper.store import ContactFacts, record_contact, run_transaction
from mapper.web import get_runtime, read_body, read_media_type

MAX_WEBHOOK_BYTES = 256 * 1024
MAX_FIELDS = 5000
REQUIRED_ONCE = ("type", "contact[id]", "contact[email]", "date_time")
FORM_TYPE = "application/x-www-form-urlencoded"
BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")

# The contact events that carry the contact block, and the status each
# leaves the contact in (None: unchanged).
CONTACT_EVENTS: dict[str, ContactStatus | None] = {
    "subscribe": ContactStatus.ACTIVE,
    "update": None,
    "unsubscribe": ContactStatus.UNSUBSCRIBED,
    "contact_tag_added": None,
    "contact_tag_removed": None,
}


async def activecampaign_webhook(request: Request) -> JSONResponse:
    """Record the contact a webhook describes; ignore kinds we do not use."""
    state = get_runtime(request)
    _check_secret(request.path_params.get("secret", ""), state.settings.webhook_secret)
    form = await _read_form(request)

    kind = _required(form, "type")
    if kind not in CONTACT_EVENTS:
        return JSONResponse({"stored": False, "reason": "Event type not used."})

    facts = read_contact_facts(form, kind)
    stored = await run_in_threadpool(
        run_transaction, state.sessions, lambda session: record_contact(session, facts)
    )
    if not stored:
        return JSONResponse({"stored": False, "reason": "Older than what is stored."})
    return JSONResponse({"stored": True})


def _check_secret(given: str, expected: object) -> None:
    # Without a configured secret nothing can match, so the endpoint is shut.
    matches = expected is not None and hmac.compare_digest(
        given.encode("utf-8"), str(expected).encode("utf-8")
    )
    if not matches:
        raise BadRequest("Invalid webhook secret.", status=401)


async def _read_form(request: Request) -> dict[str, str]:
    """Decode the form strictly: one value per field, valid escapes only."""
    if read_media_type(request) != FORM_TYPE:
        raise BadRequest(f"Expected an {FORM_TYPE} body.", status=415)
    body = await read_body(request, limit=MAX_WEBHOOK_BYTES)
    if not body.isascii() or BAD_ESCAPE.search(body):
        raise BadRequest("Expected a form body percent-encoded as UTF-8.")

    try:
        pairs = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError as exc:
        raise BadRequest("Expected a form body percent-encoded as UTF-8.") from exc
    except ValueError as exc:
        raise BadRequest(f"Expected at most {MAX_FIELDS} form fields.") from exc

    form = dict(pairs)
    for field in REQUIRED_ONCE:
        # Two values for a field mapper uses leave it unclear which AC meant.
        if sum(1 for key, _ in pairs if key == field) > 1:
            raise BadRequest(f'Expected the "{field}" field at most once.')
    return form


def _required(form: dict[str, str], field: str) -> str:
    value = form.get(field, "").strip()
    if not value:
        raise BadRequest(f'Expected a non-empty "{field}" field.', status=422)
    return value


def read_contact_facts(form: dict[str, str], kind: str) -> ContactFacts:
    """Check a contact webhook's fields and turn them into `ContactFacts`."""
    ac_contact_id = _required(form, "contact[id]")
    if not AC_ID.fullmatch(ac_contact_id):
        raise BadRequest('Expected "contact[id]" to be a numeric AC id.', status=422)
    try:
        email = normalize_email(_required(form, "contact[email]"))
    except InvalidEmail as exc:
        raise BadRequest(f'Field "contact[email]": {exc}', status=422) from exc

    return ContactFacts(
        ac_contact_id=ac_contact_id,
        email=email,
        as_of=_parse_time(_required(form, "date_time")),
        source=Source.WEBHOOK,
        status=CONTACT_EVENTS[kind],
    )


def _parse_time(value: str) -> datetime:
    # The time is required: staleness is judged by it, so a webhook without
    # one cannot be placed among the others.
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise BadRequest(
            'Expected "date_time" as ISO 8601, like 2024-05-02T08:30:00-05:00.',
            status=422,
        ) from exc

    # A time ahead of ours (AC's clock, or a typo) would make every real
    # update until then look stale, so it counts as now.
    return min(moment, utcnow())
