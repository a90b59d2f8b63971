"""Builders for the requests AC and browsers send, shared by the tests."""

from __future__ import annotations

from urllib.parse import urlencode

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mapper.models import Contact, Event, Visitor

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def contact_webhook(
    kind: str = "update",
    *,
    contact_id: str = "42",
    email: str = "alice@example.com",
    date_time: str = "2024-05-02T08:30:00-05:00",
    **extra: str,
) -> str:
    """A contact webhook body in the form AC posts it (sample F of the AC notes)."""
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
