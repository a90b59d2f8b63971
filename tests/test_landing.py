"""The email-link landing `/go`: lookups, binding, and safe redirects."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from mapper.app import create_app
from mapper.clients import _contact_from_view
from mapper.landing import safe_target
from mapper.settings import Settings
from tests.conftest import WEBHOOK_SECRET, make_settings
from tests.fake_ac import FakeAC
from tests.helpers import FORM, contact_webhook, contacts, visitors

HASH = "5f2b8c1e9a7d4c3b2a1908f7e6d5c4b3"
PAGE = "https://shop.example/pricing?utm_source=email"


def test_go_unknown_locally_asks_ac_once(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    fake_ac.add_contact(contact_id="42", email="alice@example.com", hash=HASH)

    first = client.get("/go", params={"h": HASH, "to": PAGE})
    client.get("/go", params={"h": HASH, "to": PAGE})

    assert first.status_code == 302
    assert first.headers["location"] == PAGE
    assert fake_ac.lookups() == 1
    [visitor] = visitors(engine)
    assert visitor.contact_id == contacts(engine)[0].id


def test_go_hash_uppercase_matches(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    fake_ac.add_contact(contact_id="42", email="alice@example.com", hash=HASH)

    client.get("/go", params={"h": HASH.upper(), "to": PAGE})

    assert visitors(engine)[0].contact_id is not None


def test_go_sets_cookie_attributes(client: TestClient) -> None:
    response = client.get("/go", params={"h": HASH, "to": PAGE})

    cookie = response.headers["set-cookie"]
    assert cookie.startswith("mapper_vid=mv1.")
    for attribute in ("HttpOnly", "Secure", "SameSite=lax", "Max-Age=34560000"):
        assert attribute in cookie
    assert response.headers["cache-control"] == "no-store"


def test_go_insecure_cookie_when_configured(
    database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    settings = make_settings(database_url, fake_ac, MAPPER_COOKIE_SECURE="false")
    app = create_app(settings, engine=engine, deliver=False)
    with TestClient(app, follow_redirects=False) as local:
        response = local.get("/go", params={"h": HASH, "to": PAGE})

    assert "Secure" not in response.headers["set-cookie"]


def test_go_unknown_hash_same_answer(client: TestClient, fake_ac: FakeAC) -> None:
    fake_ac.add_contact(contact_id="42", email="alice@example.com", hash=HASH)
    unknown = "0" * 32

    known = client.get("/go", params={"h": HASH, "to": PAGE})
    missing = client.get("/go", params={"h": unknown, "to": PAGE})

    assert (known.status_code, missing.status_code) == (302, 302)
    assert known.headers["location"] == missing.headers["location"]
    assert sorted(known.headers.keys()) == sorted(missing.headers.keys())
    assert known.content == missing.content == b""


def test_go_unknown_hash_asked_once(client: TestClient, fake_ac: FakeAC) -> None:
    for _ in range(3):
        client.get("/go", params={"h": "1" * 32, "to": PAGE})

    assert fake_ac.lookups() == 1


@pytest.mark.parametrize(
    "bad_hash",
    [
        pytest.param("", id="empty"),
        pytest.param("abc", id="short"),
        pytest.param("g" * 32, id="not-hex"),
        pytest.param("a" * 33, id="long"),
        pytest.param("alice@example.com", id="an-email"),
    ],
)
def test_go_malformed_hash_no_ac_call(
    client: TestClient, engine: Engine, fake_ac: FakeAC, bad_hash: str
) -> None:
    response = client.get("/go", params={"h": bad_hash, "to": PAGE})

    assert response.status_code == 302
    assert fake_ac.requests == []
    assert visitors(engine)[0].contact_id is None


def test_go_webhook_contact_needs_lookup_for_hash(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    url = f"/webhooks/activecampaign/{WEBHOOK_SECRET}"
    client.post(url, content=contact_webhook("subscribe"), headers=FORM)
    fake_ac.add_contact(contact_id="42", email="alice@example.com", hash=HASH)

    client.get("/go", params={"h": HASH, "to": PAGE})

    [contact] = contacts(engine)
    assert contact.ac_hash == HASH
    assert visitors(engine)[0].contact_id == contact.id


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            {"result_code": 1, "id": "42", "email": "a@example.com", "hash": "f" * 32},
            id="other-hash",
        ),
        pytest.param(
            {"result_code": 1, "id": "x", "email": "a@example.com", "hash": HASH},
            id="bad-id",
        ),
        pytest.param(
            {"result_code": 1, "id": "42", "email": "nope", "hash": HASH},
            id="bad-email",
        ),
        pytest.param({"result_code": 1, "id": "42", "hash": HASH}, id="no-email"),
        pytest.param({"result_code": 1, "0": {"id": "42"}}, id="list-shape"),
        pytest.param({"result_code": 0, "result_message": "Nothing"}, id="not-found"),
    ],
)
def test_view_hash_refuses_odd_answers(answer: dict[str, object]) -> None:
    assert _contact_from_view(answer, HASH) is None


@pytest.mark.parametrize("mode", ["down", "html", "error", "rate_limit"])
def test_go_ac_unavailable_still_redirects(
    client: TestClient, engine: Engine, fake_ac: FakeAC, mode: str
) -> None:
    fake_ac.add_contact(contact_id="42", email="alice@example.com", hash=HASH)
    fake_ac.set_mode(mode)

    response = client.get("/go", params={"h": HASH, "to": PAGE})
    fake_ac.set_mode("up")
    client.get("/go", params={"h": HASH, "to": PAGE})

    assert response.status_code == 302
    assert visitors(engine)[0].contact_id is not None


def test_go_without_api_settings_no_call(
    database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    settings = make_settings(database_url, None)
    app = create_app(settings, engine=engine, deliver=False)
    with TestClient(app, follow_redirects=False) as local:
        response = local.get("/go", params={"h": HASH, "to": PAGE})

    assert response.status_code == 302
    assert fake_ac.requests == []


def test_go_reuses_cookie_visitor(client: TestClient, engine: Engine) -> None:
    client.get("/go", params={"h": HASH, "to": PAGE})
    client.get("/go", params={"h": HASH, "to": PAGE})

    assert len(visitors(engine)) == 1


def test_go_tampered_cookie_new_visitor(client: TestClient, engine: Engine) -> None:
    client.get("/go", params={"h": HASH, "to": PAGE})
    cookie = client.cookies["mapper_vid"]
    client.cookies.clear()
    client.cookies.set("mapper_vid", cookie[:-2] + "xx", domain="mapper.shop.example")

    response = client.get("/go", params={"h": HASH, "to": PAGE})

    assert response.status_code == 302
    assert len(visitors(engine)) == 2


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("https://evil.example/", id="foreign-host"),
        pytest.param("https://shop.example.evil.example/", id="suffix-host"),
        pytest.param("https://shop.example@evil.example/", id="userinfo"),
        pytest.param("//evil.example/", id="scheme-relative"),
        pytest.param("javascript:alert(1)", id="javascript"),
        pytest.param("https:\\\\evil.example", id="backslashes"),
        pytest.param("/relative/path", id="relative"),
        pytest.param("ftp://shop.example/", id="ftp"),
        pytest.param("https://shop.example/\n", id="newline"),
        pytest.param("https://shop.example/" + "a" * 3000, id="too-long"),
        pytest.param("", id="empty"),
    ],
)
def test_go_refuses_foreign_target(client: TestClient, target: str) -> None:
    response = client.get("/go", params={"h": HASH, "to": target})

    assert response.status_code == 302
    assert response.headers["location"] == "https://shop.example/"


def test_go_default_redirect_setting(
    database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    settings = make_settings(
        database_url, fake_ac, MAPPER_DEFAULT_REDIRECT="https://shop.example/hello"
    )
    app = create_app(settings, engine=engine, deliver=False)
    with TestClient(app, follow_redirects=False) as local:
        response = local.get("/go", params={"to": "https://evil.example/"})

    assert response.headers["location"] == "https://shop.example/hello"


def test_go_no_hosts_lands_on_neutral_page(database_url: str, engine: Engine) -> None:
    settings = make_settings(database_url, None, MAPPER_ALLOWED_HOSTS="")
    app = create_app(settings, engine=engine, deliver=False)
    with TestClient(app) as local:
        response = local.get("/go", params={"to": "https://shop.example/"})

    assert response.status_code == 200
    assert "Thanks for visiting" in response.text


def test_go_strips_hash_from_target(client: TestClient) -> None:
    target = f"https://shop.example/p?h={HASH}&plan=pro&ref=x{HASH.upper()}#{HASH}"

    response = client.get("/go", params={"h": HASH, "to": target})

    assert response.headers["location"] == "https://shop.example/p?plan=pro"


def test_go_keeps_unrelated_target(settings: Settings) -> None:
    target = "http://shop.example:8080/a?b=c#top"

    assert safe_target(target, settings, HASH) == target
