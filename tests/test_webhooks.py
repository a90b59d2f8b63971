"""The AC webhook receiver, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from mapper.db import make_sessionmaker
from mapper.store import ContactFacts, record_contact, run_transaction
from mapper.webhooks import contact_facts
from tests.conftest import WEBHOOK_SECRET
from tests.helpers import FORM, contact_webhook, contacts

URL = f"/webhooks/activecampaign/{WEBHOOK_SECRET}"


def test_webhook_subscribe_stores_contact(client: TestClient, engine: Engine) -> None:
    response = client.post(URL, content=contact_webhook("subscribe"), headers=FORM)

    assert response.status_code == 200
    [contact] = contacts(engine)
    assert (contact.ac_contact_id, contact.email) == ("42", "alice@example.com")
    assert contact.status == "active"


@pytest.mark.parametrize(
    "kind", ["update", "unsubscribe", "contact_tag_added", "contact_tag_removed"]
)
def test_webhook_contact_kinds_upsert(
    client: TestClient, engine: Engine, kind: str
) -> None:
    client.post(URL, content=contact_webhook("subscribe"), headers=FORM)

    later = contact_webhook(kind, date_time="2024-06-01T00:00:00+00:00")
    response = client.post(URL, content=later, headers=FORM)

    assert response.status_code == 200
    assert len(contacts(engine)) == 1


def test_webhook_unsubscribe_sets_status(client: TestClient, engine: Engine) -> None:
    client.post(URL, content=contact_webhook("unsubscribe"), headers=FORM)

    assert contacts(engine)[0].status == "unsubscribed"


def test_webhook_update_replaces_email(client: TestClient, engine: Engine) -> None:
    client.post(URL, content=contact_webhook("subscribe"), headers=FORM)

    changed = contact_webhook(
        email=" Alice.New@EXAMPLE.com ", date_time="2024-05-03T00:00:00Z"
    )
    client.post(URL, content=changed, headers=FORM)

    [contact] = contacts(engine)
    assert contact.email == "Alice.New@example.com"


def test_webhook_stale_update_changes_nothing(
    client: TestClient, engine: Engine
) -> None:
    newer = contact_webhook(email="new@example.com", date_time="2024-05-03T10:00:00Z")
    older = contact_webhook(email="old@example.com", date_time="2024-05-02T10:00:00Z")

    client.post(URL, content=newer, headers=FORM)
    response = client.post(URL, content=older, headers=FORM)

    assert response.status_code == 200
    assert contacts(engine)[0].email == "new@example.com"


def test_webhook_duplicate_delivery_one_row(client: TestClient, engine: Engine) -> None:
    body = contact_webhook("subscribe")

    first = client.post(URL, content=body, headers=FORM)
    second = client.post(URL, content=body, headers=FORM)

    assert (first.status_code, second.status_code) == (200, 200)
    assert len(contacts(engine)) == 1


def test_webhook_concurrent_duplicates_one_row(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    facts = contact_facts(dict(_pairs(contact_webhook("subscribe"))), "subscribe")
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def deliver() -> None:
        barrier.wait()
        try:
            run_transaction(sessions, lambda session: record_contact(session, facts))
        except BaseException as exc:  # noqa: B036 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(contacts(engine)) == 1


def _pairs(body: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(body, keep_blank_values=True)


def test_webhook_moved_email_released(client: TestClient, engine: Engine) -> None:
    first = contact_webhook(contact_id="1", date_time="2024-05-01T00:00:00Z")
    moved = contact_webhook(contact_id="2", date_time="2024-05-02T00:00:00Z")

    client.post(URL, content=first, headers=FORM)
    client.post(URL, content=moved, headers=FORM)

    emails = {c.ac_contact_id: c.email for c in contacts(engine)}
    assert emails == {"1": None, "2": "alice@example.com"}


def test_webhook_older_claim_on_taken_email(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    newer = ContactFacts("2", "alice@example.com", _at("2024-05-02"), "webhook")
    older = ContactFacts("1", "alice@example.com", _at("2024-05-01"), "webhook")

    for facts in (newer, older):
        run_transaction(sessions, lambda s, f=facts: record_contact(s, f))

    emails = {c.ac_contact_id: c.email for c in contacts(engine)}
    assert emails == {"1": None, "2": "alice@example.com"}


def _at(day: str):  # type: ignore[no-untyped-def]
    from datetime import datetime

    return datetime.fromisoformat(day + "T00:00:00+00:00")


def test_webhook_other_type_ignored(client: TestClient, engine: Engine) -> None:
    body = "type=open&campaign%5Bid%5D=3&contact%5Bid%5D=42"

    response = client.post(URL, content=body, headers=FORM)

    assert response.status_code == 200
    assert contacts(engine) == []


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("/webhooks/activecampaign/wrong-secret-value", id="wrong"),
        pytest.param("/webhooks/activecampaign", id="missing"),
        pytest.param(URL[:-1], id="prefix"),
    ],
)
def test_webhook_bad_secret_is_401(
    client: TestClient, engine: Engine, url: str
) -> None:
    response = client.post(url, content=contact_webhook(), headers=FORM)

    assert response.status_code == 401
    assert response.json() == {"error": "Invalid webhook secret.", "status": 401}
    assert contacts(engine) == []


def test_webhook_unset_secret_refuses_all(client: TestClient, engine: Engine) -> None:
    state = client.app.state.runtime  # type: ignore[attr-defined]
    state.settings = type(state.settings)(
        **{**state.settings.__dict__, "webhook_secret": None}
    )

    response = client.post(URL, content=contact_webhook(), headers=FORM)

    assert response.status_code == 401
    assert contacts(engine) == []


@pytest.mark.parametrize(
    ("body", "headers", "status", "field"),
    [
        pytest.param(
            '{"type":"update"}',
            {"Content-Type": "application/json"},
            415,
            "x-www-form-urlencoded",
            id="json",
        ),
        pytest.param(
            "type=update&contact%5Bemail%5D=%FF%FE", FORM, 400, "UTF-8", id="bad-utf8"
        ),
        pytest.param(
            "type=update&contact\xff=1".encode("latin-1"),
            FORM,
            400,
            "UTF-8",
            id="raw-bytes",
        ),
        pytest.param("contact%5Bid%5D=42", FORM, 422, '"type"', id="no-type"),
        pytest.param(
            contact_webhook(contact_id=""), FORM, 422, "contact[id]", id="no-id"
        ),
        pytest.param(
            contact_webhook(contact_id="4x2"), FORM, 422, "contact[id]", id="bad-id"
        ),
        pytest.param(
            contact_webhook(email=""), FORM, 422, "contact[email]", id="blank-email"
        ),
        pytest.param(
            contact_webhook(email="not-an-email"),
            FORM,
            422,
            "contact[email]",
            id="invalid-email",
        ),
        pytest.param(
            contact_webhook(email="a\u200b@example.com"),
            FORM,
            422,
            "contact[email]",
            id="invisible-email",
        ),
        pytest.param(
            contact_webhook(date_time="yesterday"),
            FORM,
            422,
            "date_time",
            id="bad-time",
        ),
        pytest.param(
            "&".join(f"f{i}=1" for i in range(1100)),
            FORM,
            400,
            "form",
            id="too-many-fields",
        ),
    ],
)
def test_webhook_bad_input_refused(
    client: TestClient,
    engine: Engine,
    body: str | bytes,
    headers: dict[str, str],
    status: int,
    field: str,
) -> None:
    response = client.post(URL, content=body, headers=headers)

    assert response.status_code == status
    assert field in response.json()["error"]
    assert contacts(engine) == []


def test_webhook_error_hides_email(client: TestClient) -> None:
    body = contact_webhook(email="planted.secret@@example.com")

    response = client.post(URL, content=body, headers=FORM)

    assert response.status_code == 422
    assert "planted.secret" not in response.text


def test_webhook_oversized_body_413(client: TestClient, engine: Engine) -> None:
    body = contact_webhook(**{"contact[fields][1]": "x" * 300_000})

    response = client.post(URL, content=body, headers=FORM)

    assert response.status_code == 413
    assert contacts(engine) == []


def test_webhook_naive_time_taken_as_utc(client: TestClient, engine: Engine) -> None:
    body = contact_webhook(date_time="2024-05-02T08:30:00")

    client.post(URL, content=body, headers=FORM)

    stored = contacts(engine)[0].ac_updated_at
    assert stored is not None and stored.isoformat() == "2024-05-02T08:30:00+00:00"


def test_webhook_missing_time_is_now(client: TestClient, engine: Engine) -> None:
    client.post(URL, content=contact_webhook(date_time=""), headers=FORM)

    assert contacts(engine)[0].ac_updated_at is not None
