"""The email-link landing `/go`: lookups, binding, and safe redirects."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from mapper.landing import choose_target
from mapper.models import utcnow
from mapper.settings import Settings
from tests.conftest import ClientFactory
from tests.fake_ac import FakeAC
from tests.helpers import (
    EMAIL,
    FORM,
    HASH,
    PAGE,
    WEBHOOK_URL,
    contact_webhook,
    contacts,
    visitors,
)

LINK = {"h": HASH, "to": PAGE}


def test_go_asks_ac_once(client: TestClient, engine: Engine, fake_ac: FakeAC) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)

    first = client.get("/go", params=LINK)
    client.get("/go", params=LINK)

    assert (first.status_code, first.headers["location"]) == (302, PAGE)
    assert fake_ac.lookups() == 1


def test_go_binds_visitor_to_contact(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)

    client.get("/go", params=LINK)

    [visitor] = visitors(engine)
    assert visitor.contact_id == contacts(engine)[0].id
    assert visitor.identified_by == "hash"


def test_go_uppercase_hash_matches(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)

    client.get("/go", params={"h": HASH.upper(), "to": PAGE})

    assert visitors(engine)[0].contact_id is not None


def test_go_cookie_attributes(client: TestClient) -> None:
    response = client.get("/go", params=LINK)

    cookie = response.headers["set-cookie"]
    assert cookie.startswith("mapper_vid=mv1.")
    for attribute in ("HttpOnly", "Secure", "SameSite=lax", "Max-Age=34560000"):
        assert attribute in cookie
    assert response.headers["cache-control"] == "no-store"


def test_go_insecure_cookie_setting(client_with: ClientFactory) -> None:
    client = client_with(MAPPER_COOKIE_SECURE="false")

    response = client.get("/go", params=LINK)

    assert "Secure" not in response.headers["set-cookie"]


def test_go_unknown_hash_looks_same(client: TestClient, fake_ac: FakeAC) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)

    known = client.get("/go", params=LINK)
    missing = client.get("/go", params={"h": "0" * 32, "to": PAGE})

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
        pytest.param(EMAIL, id="an-email"),
    ],
)
def test_go_malformed_hash_no_lookup(
    client: TestClient, engine: Engine, fake_ac: FakeAC, bad_hash: str
) -> None:
    response = client.get("/go", params={"h": bad_hash, "to": PAGE})

    assert response.status_code == 302
    assert fake_ac.requests == []
    assert visitors(engine)[0].contact_id is None


def test_go_webhook_contact_gains_hash(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    client.post(WEBHOOK_URL, content=contact_webhook("subscribe"), headers=FORM)
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)

    client.get("/go", params=LINK)

    [contact] = contacts(engine)
    assert contact.ac_hash == HASH
    assert visitors(engine)[0].contact_id == contact.id


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("down", id="down"),
        pytest.param("html", id="html"),
        pytest.param("error", id="error"),
    ],
)
def test_go_ac_failure_asks_again(
    client: TestClient, engine: Engine, fake_ac: FakeAC, mode: str
) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
    fake_ac.set_mode(mode)

    response = client.get("/go", params=LINK)
    fake_ac.set_mode("up")
    client.get("/go", params=LINK)

    assert response.status_code == 302
    assert visitors(engine)[0].contact_id is not None


@pytest.mark.parametrize("mode", ["rate_limit", "unavailable"])
def test_go_rate_limit_pauses_lookups(
    client: TestClient, engine: Engine, fake_ac: FakeAC, mode: str
) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
    fake_ac.set_mode(mode, retry_after=60)

    client.get("/go", params=LINK)
    fake_ac.set_mode("up")
    during_pause = client.get("/go", params=LINK)

    assert during_pause.status_code == 302
    assert fake_ac.lookups() == 1
    assert visitors(engine)[0].contact_id is None


def test_go_asks_again_after_retry_after(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
    fake_ac.set_mode("rate_limit", retry_after=1)

    client.get("/go", params=LINK)
    fake_ac.set_mode("up")
    time.sleep(1.1)
    client.get("/go", params=LINK)

    assert fake_ac.lookups() == 2
    assert visitors(engine)[0].contact_id is not None


def test_go_unconfigured_no_call(client_with: ClientFactory, fake_ac: FakeAC) -> None:
    client = client_with(with_ac=False)

    response = client.get("/go", params=LINK)

    assert response.status_code == 302
    assert fake_ac.requests == []


def test_go_reuses_cookie_visitor(client: TestClient, engine: Engine) -> None:
    client.get("/go", params=LINK)
    client.get("/go", params=LINK)

    assert len(visitors(engine)) == 1


def test_go_tampered_cookie_new_visitor(client: TestClient, engine: Engine) -> None:
    client.get("/go", params=LINK)
    cookie = client.cookies["mapper_vid"]
    client.cookies.clear()
    client.cookies.set("mapper_vid", cookie[:-2] + "xx", domain="mapper.shop.example")

    response = client.get("/go", params=LINK)

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
        pytest.param(f"https://shop.example/p/{HASH}", id="hash-in-path"),
        pytest.param(f"https://{HASH}@shop.example/", id="hash-as-user"),
        pytest.param("https://user:pass@shop.example/", id="credentials"),
        pytest.param("https://[shop.example/", id="bad-brackets"),
        pytest.param("https://shop.example:99999/", id="bad-port"),
    ],
)
def test_go_refuses_unsafe_target(client: TestClient, target: str) -> None:
    response = client.get("/go", params={"h": HASH, "to": target})

    assert response.status_code == 302
    assert response.headers["location"] == "https://shop.example/"


def test_go_default_redirect_setting(client_with: ClientFactory) -> None:
    client = client_with(MAPPER_DEFAULT_REDIRECT="https://shop.example/hello")

    response = client.get("/go", params={"to": "https://evil.example/"})

    assert response.headers["location"] == "https://shop.example/hello"


def test_go_no_hosts_neutral_page(client_with: ClientFactory) -> None:
    client = client_with(with_ac=False, MAPPER_ALLOWED_HOSTS="")

    response = client.get("/go", params={"to": "https://shop.example/"})
    page = client.get(response.headers["location"])

    assert response.headers["location"] == "/landed"
    assert "Thanks for visiting" in page.text


def test_go_strips_hash_from_target(client: TestClient) -> None:
    target = f"https://shop.example/p?h={HASH}&plan=pro&x{HASH.upper()}=1#{HASH}"

    response = client.get("/go", params={"h": HASH, "to": target})

    assert response.headers["location"] == "https://shop.example/p?plan=pro"


@pytest.mark.parametrize(
    ("target", "given"),
    [
        pytest.param("http://shop.example:8080/a?b=c#top", HASH, id="unrelated"),
        pytest.param("https://shop.example/p?utm=1#top", HASH, id="utm"),
        pytest.param("https://shop.example/?q=a%20b&flag", HASH, id="encoding-kept"),
        pytest.param("https://shop.example/?e=eee", None, id="malformed-hash"),
    ],
)
def test_choose_target_keeps_rest(
    settings: Settings, target: str, given: str | None
) -> None:
    assert choose_target(target, settings=settings, ac_hash=given) == target


def test_go_refused_key_retried(
    client_with: ClientFactory, engine: Engine, fake_ac: FakeAC
) -> None:
    client = client_with(MAPPER_AC_API_KEY="not-the-right-key")

    client.get("/go", params=LINK)
    client.get("/go", params=LINK)

    assert fake_ac.lookups() == 2
    assert visitors(engine)[0].contact_id is None


def test_go_lookup_older_than_row(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    # A webhook dated a little ahead (a clock skew) must not stop the
    # lookup from telling which contact has the hash.
    ahead = (utcnow() + timedelta(hours=6)).isoformat()
    client.post(WEBHOOK_URL, content=contact_webhook(date_time=ahead), headers=FORM)
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)

    client.get("/go", params=LINK)

    assert visitors(engine)[0].contact_id == contacts(engine)[0].id


def test_choose_target_strips_only_hash(settings: Settings) -> None:
    escaped = HASH[:3] + "%" + format(ord(HASH[3]), "x") + HASH[4:]
    target = f"https://shop.example/p?flag&a=1;b=2&h={escaped}&x=%FF"

    chosen = choose_target(target, settings=settings, ac_hash=HASH)

    assert chosen == "https://shop.example/p?flag&a=1;b=2&x=%FF"
