"""Values and builders the tests share: settings as an operator gives them,
the bodies AC and browsers send, and reads of what the database holds.

Every email, hash and key here is made up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlencode

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from mapper.models import Contact, Event, Source, Visitor, utcnow
from mapper.settings import Settings, load_settings
from mapper.store import (
    ContactFacts,
    NewEvent,
    add_events,
    identify_visitor,
    record_contact,
    touch_visitor,
)
from mapper.tokens import VisitorId
from tests.fake_ac import FakeAC

SECRET_KEY = "test-signing-key-0123456789abcdef"
WEBHOOK_SECRET = "test-webhook-secret-0123456789"
WEBHOOK_URL = f"/webhooks/activecampaign/{WEBHOOK_SECRET}"
SITE = "shop.example"
PAGE = f"https://{SITE}/pricing?utm_source=email"
ORIGIN = f"https://{SITE}"
EMAIL = "alice@example.com"
HASH = "5f2b8c1e9a7d4c3b2a1908f7e6d5c4b3"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON_FROM_SITE = {"Content-Type": "application/json", "Origin": ORIGIN}


def ac_env(fake_ac: FakeAC) -> dict[str, str]:
    """The settings that point mapper at the fake AC."""
    return {
        "MAPPER_AC_API_URL": fake_ac.url,
        "MAPPER_AC_API_KEY": fake_ac.api_key,
        "MAPPER_AC_ACTID": fake_ac.actid,
        "MAPPER_AC_EVENT_KEY": fake_ac.event_key,
        "MAPPER_AC_TRACK_URL": fake_ac.track_url,
    }


def make_settings(database_url: str, fake_ac: FakeAC | None, **env: str) -> Settings:
    """Settings as an operator would give them, pointed at the fake AC."""
    environ = {
        "MAPPER_DATABASE_URL": database_url,
        "MAPPER_SECRET_KEYS": SECRET_KEY,
        "MAPPER_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "MAPPER_ALLOWED_HOSTS": SITE,
        "MAPPER_ALLOWED_ORIGINS": ORIGIN,
    }
    if fake_ac is not None:
        environ |= ac_env(fake_ac)
    return load_settings(environ | env, env_file=None)


def contact_webhook(
    kind: str = "update",
    *,
    contact_id: str = "42",
    email: str = EMAIL,
    date_time: str = "2024-05-02T08:30:00-05:00",
    **extra: str,
) -> str:
    """A contact webhook body in the form AC posts it, bracketed keys and all."""
    fields = {
        "type": kind,
        "date_time": date_time,
        "initiated_from": "admin",
        "initiated_by": "admin",
        "list": "0",
        "contact[id]": contact_id,
        "contact[email]": email,
        "contact[first_name]": "Alice",
        "contact[last_name]": "Example",
        "contact[phone]": "",
        "contact[ip]": "0.0.0.0",
        "contact[tags]": "newsletter, customer",
        "contact[fields][27]": "gold",
        "customer_acct_name": "",
        "customer_acct_id": "0",
        **extra,
    }
    return urlencode(fields)


def contacts(engine: Engine) -> list[Contact]:
    with Session(engine) as session:
        return list(session.scalars(select(Contact).order_by(Contact.id)))


def visitors(engine: Engine) -> list[Visitor]:
    with Session(engine) as session:
        return list(session.scalars(select(Visitor).order_by(Visitor.id)))


def events(engine: Engine) -> list[Event]:
    with Session(engine) as session:
        return list(session.scalars(select(Event).order_by(Event.id)))


def wait_until(condition: Callable[[], object], *, seconds: float = 30) -> None:
    """Poll `condition` until it is true; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Not true within {seconds} seconds.")
        time.sleep(0.05)


def add_visitors_with_events(
    sessions: sessionmaker[Session], *, visitors: int, each: int, prefix: str = "v"
) -> None:
    """Store identified visitors with pending events, in one transaction.

    Each of the `visitors` has a contact of its own, with the made-up email
    <prefix><visitor>@example.com, and `each` events named
    <prefix><visitor>_<n>.
    """
    now = utcnow()
    with sessions.begin() as session:
        for number in range(visitors):
            facts = ContactFacts(
                ac_contact_id=f"{prefix}{number}",
                email=f"{prefix}{number}@example.com",
                as_of=now,
                source=Source.WEBHOOK,
            )
            record_contact(session, facts)
            contact = session.scalars(
                select(Contact).where(Contact.ac_contact_id == facts.ac_contact_id)
            ).one()
            visitor = touch_visitor(session, None)
            identify_visitor(session, visitor, contact, how=Source.HASH, held_since=now)
            named = VisitorId(visitor.public_id)
            add_events(
                session,
                [
                    NewEvent(named, f"{prefix}{number}_{event}", None, None)
                    for event in range(each)
                ],
                hold=None,
            )
