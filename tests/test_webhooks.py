"""The AC webhook receiver, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime
from urllib.parse import parse_qsl

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from mapper.db import make_sessionmaker
from mapper.models import Source, utcnow
from mapper.store import ContactFacts, record_contact, run_transaction
from mapper.webhooks import read_contact_facts
from tests.conftest import ClientFactory
from tests.helpers import EMAIL, FORM, WEBHOOK_URL, contact_webhook, contacts


def test_webhook_subscribe_stores_contact(client: TestClient, engine: Engine) -> None:
    response = client.post(
        WEBHOOK_URL, content=contact_webhook("subscribe"), headers=FORM
    )

    assert response.json() == {"stored": True}
    [contact] = contacts(engine)
    assert (contact.ac_contact_id, contact.email, contact.status) == (
        "42",
        EMAIL,
        "active",
    )


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("update", id="update"),
        pytest.param("unsubscribe", id="unsubscribe"),
        pytest.param("contact_tag_added", id="tag-added"),
        pytest.param("contact_tag_removed", id="tag-removed"),
    ],
)
def test_webhook_contact_kinds_upsert(
    client: TestClient, engine: Engine, kind: str
) -> None:
    client.post(WEBHOOK_URL, content=contact_webhook("subscribe"), headers=FORM)

    later = contact_webhook(kind, date_time="2024-06-01T00:00:00+00:00")
    response = client.post(WEBHOOK_URL, content=later, headers=FORM)

    assert response.json() == {"stored": True}
    assert len(contacts(engine)) == 1


def test_webhook_unsubscribe_sets_status(client: TestClient, engine: Engine) -> None:
    client.post(WEBHOOK_URL, content=contact_webhook("unsubscribe"), headers=FORM)

    assert contacts(engine)[0].status == "unsubscribed"


def test_webhook_update_replaces_email(client: TestClient, engine: Engine) -> None:
    client.post(WEBHOOK_URL, content=contact_webhook("subscribe"), headers=FORM)

    changed = contact_webhook(
        email=" Alice.New@EXAMPLE.com ", date_time="2024-05-03T00:00:00Z"
    )
    client.post(WEBHOOK_URL, content=changed, headers=FORM)

    assert [c.email for c in contacts(engine)] == ["Alice.New@example.com"]


def test_webhook_stale_update_ignored(client: TestClient, engine: Engine) -> None:
    newer = contact_webhook(email="new@example.com", date_time="2024-05-03T10:00:00Z")
    older = contact_webhook(email="old@example.com", date_time="2024-05-02T10:00:00Z")

    client.post(WEBHOOK_URL, content=newer, headers=FORM)
    response = client.post(WEBHOOK_URL, content=older, headers=FORM)

    assert response.json() == {"stored": False, "reason": "Older than what is stored."}
    assert contacts(engine)[0].email == "new@example.com"


def test_webhook_duplicate_delivery_one_row(client: TestClient, engine: Engine) -> None:
    body = contact_webhook("subscribe")

    first = client.post(WEBHOOK_URL, content=body, headers=FORM)
    second = client.post(WEBHOOK_URL, content=body, headers=FORM)

    assert (first.status_code, second.status_code) == (200, 200)
    assert len(contacts(engine)) == 1


def _facts(body: str, kind: str = "subscribe") -> ContactFacts:
    return read_contact_facts(dict(parse_qsl(body, keep_blank_values=True)), kind)


def test_webhook_concurrent_duplicates_one_row(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    facts = _facts(contact_webhook("subscribe"))
    errors: list[Exception] = []
    barrier = threading.Barrier(8)

    def deliver() -> None:
        barrier.wait()
        try:
            run_transaction(sessions, lambda session: record_contact(session, facts))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(contacts(engine)) == 1


def test_webhook_moved_email_released(client: TestClient, engine: Engine) -> None:
    first = contact_webhook(contact_id="1", date_time="2024-05-01T00:00:00Z")
    moved = contact_webhook(contact_id="2", date_time="2024-05-02T00:00:00Z")

    client.post(WEBHOOK_URL, content=first, headers=FORM)
    client.post(WEBHOOK_URL, content=moved, headers=FORM)

    emails = {c.ac_contact_id: c.email for c in contacts(engine)}
    assert emails == {"1": None, "2": EMAIL}


def test_webhook_older_claim_unknown_email(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    day = datetime.fromisoformat
    newer = ContactFacts("2", EMAIL, day("2024-05-02T00:00Z"), Source.WEBHOOK)
    older = ContactFacts("1", EMAIL, day("2024-05-01T00:00Z"), Source.WEBHOOK)

    for facts in (newer, older):
        with sessions.begin() as session:
            record_contact(session, facts)

    emails = {c.ac_contact_id: c.email for c in contacts(engine)}
    assert emails == {"1": None, "2": EMAIL}


def test_webhook_other_type_ignored(client: TestClient, engine: Engine) -> None:
    body = "type=open&campaign%5Bid%5D=3&contact%5Bid%5D=42"

    response = client.post(WEBHOOK_URL, content=body, headers=FORM)

    assert response.json() == {"stored": False, "reason": "Event type not used."}
    assert contacts(engine) == []


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("/webhooks/activecampaign/wrong-secret-value", id="wrong"),
        pytest.param("/webhooks/activecampaign", id="missing"),
        pytest.param(WEBHOOK_URL[:-1], id="prefix"),
        pytest.param(WEBHOOK_URL + "0", id="longer"),
    ],
)
def test_webhook_bad_secret_401(client: TestClient, engine: Engine, url: str) -> None:
    response = client.post(url, content=contact_webhook(), headers=FORM)

    assert response.json() == {"error": "Invalid webhook secret.", "status": 401}
    assert contacts(engine) == []


def test_webhook_trailing_slash_json_404(client: TestClient) -> None:
    response = client.post("/webhooks/activecampaign/", content="", headers=FORM)

    assert response.json() == {"error": "Not Found", "status": 404}


def test_webhook_unset_secret_refuses(
    client_with: ClientFactory, engine: Engine
) -> None:
    client = client_with(MAPPER_WEBHOOK_SECRET="")

    response = client.post(WEBHOOK_URL, content=contact_webhook(), headers=FORM)

    assert response.status_code == 401
    assert contacts(engine) == []


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("body", "headers", "status", "field"),
    [
        pytest.param('{"type":"update"}', JSON, 415, "urlencoded", id="json"),
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
            contact_webhook(contact_id="\u0664\u0662"),
            FORM,
            422,
            "contact[id]",
            id="arabic-digits",
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
            contact_webhook(date_time=""), FORM, 422, "date_time", id="no-time"
        ),
        pytest.param(
            contact_webhook(date_time="0001-01-01T00:00:00+01:00"),
            FORM,
            422,
            "date_time",
            id="time-underflow",
        ),
        pytest.param(
            contact_webhook(date_time="9999-12-31T23:59:59-01:00"),
            FORM,
            422,
            "date_time",
            id="time-overflow",
        ),
        pytest.param(
            contact_webhook() + "&contact%5Bid%5D=78",
            FORM,
            400,
            "contact[id]",
            id="repeated-field",
        ),
        pytest.param(
            contact_webhook(email="carol%ZZ@example.com").replace("%25ZZ", "%ZZ"),
            FORM,
            400,
            "percent-encoded",
            id="bad-escape",
        ),
        pytest.param(
            "&".join(f"f{i}=1" for i in range(5100)),
            FORM,
            400,
            "form fields",
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
    response = client.post(WEBHOOK_URL, content=body, headers=headers)

    assert response.status_code == status
    assert field in response.json()["error"]
    assert contacts(engine) == []


def test_webhook_error_hides_email(client: TestClient) -> None:
    body = contact_webhook(email="planted.secret@@example.com")

    response = client.post(WEBHOOK_URL, content=body, headers=FORM)

    assert response.status_code == 422
    assert "planted.secret" not in response.text


def test_webhook_oversized_body_413(client: TestClient, engine: Engine) -> None:
    body = contact_webhook(**{"contact[fields][1]": "x" * 300_000})

    response = client.post(WEBHOOK_URL, content=body, headers=FORM)

    assert response.status_code == 413
    assert contacts(engine) == []


def test_webhook_naive_time_is_utc(client: TestClient, engine: Engine) -> None:
    body = contact_webhook(date_time="2024-05-02T08:30:00")

    client.post(WEBHOOK_URL, content=body, headers=FORM)

    stored = contacts(engine)[0].ac_updated_at
    assert stored == datetime.fromisoformat("2024-05-02T08:30:00+00:00")


def test_webhook_future_time_counts_as_now(client: TestClient, engine: Engine) -> None:
    ahead = contact_webhook(email="typo@example.com", date_time="2999-01-01T00:00Z")
    client.post(WEBHOOK_URL, content=ahead, headers=FORM)

    current = contact_webhook(email="real@example.com", date_time=utcnow().isoformat())
    client.post(WEBHOOK_URL, content=current, headers=FORM)

    assert contacts(engine)[0].email == "real@example.com"


def test_webhook_unused_field_repeated(client: TestClient, engine: Engine) -> None:
    body = contact_webhook() + "&contact%5Btags%5D=vip"

    response = client.post(WEBHOOK_URL, content=body, headers=FORM)

    assert response.json() == {"stored": True}
