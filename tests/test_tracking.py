"""Event intake `/track`: validation, de-duplication, holding, and CORS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import httpx2
import pytest
from freezegun import freeze_time
from sqlalchemy import Engine, delete, update
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from mapper.models import Event, Visitor, utcnow
from tests.conftest import ClientFactory
from tests.fake_ac import FakeAC
from tests.helpers import EMAIL, HASH, ORIGIN, PAGE, events, visitors

FROM_SITE = {"Origin": ORIGIN}


def _track(client: TestClient, payload: object, **headers: str) -> httpx2.Response:
    return client.post(
        "/track",
        content=json.dumps(payload),
        headers={"Content-Type": "application/json", **FROM_SITE, **headers},
    )


def _identify(client: TestClient, fake_ac: FakeAC) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
    client.get("/go", params={"h": HASH, "to": PAGE})


def test_track_identified_is_pending(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    _identify(client, fake_ac)

    response = _track(client, {"event": "viewed_pricing", "data": "plan=pro"})

    assert response.status_code == 202
    [event] = events(engine)
    assert (event.status, event.name, event.data) == (
        "pending",
        "viewed_pricing",
        "plan=pro",
    )
    assert event.contact_id is not None


def test_track_anonymous_is_held(client: TestClient, engine: Engine) -> None:
    response = _track(client, {"event": "viewed_pricing"})

    assert response.status_code == 202
    assert "mapper_vid=mv1." in response.headers["set-cookie"]
    assert [event.status for event in events(engine)] == ["held"]


def test_track_held_until_identified(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    _track(client, {"event": "first"})
    _track(client, {"event": "second"})

    _identify(client, fake_ac)

    released = events(engine)
    assert [event.status for event in released] == ["pending", "pending"]
    assert {event.contact_id for event in released} == {visitors(engine)[0].contact_id}


def test_track_held_capped_per_visitor(
    client_with: ClientFactory, engine: Engine
) -> None:
    client = client_with(MAPPER_HELD_EVENTS_PER_VISITOR="2")
    _track(client, {"event": "first"})
    _track(client, {"event": "second"})

    response = _track(client, {"event": "third"})

    assert response.status_code == 429
    assert "at most 2 held events" in response.json()["error"]
    assert [event.name for event in events(engine)] == ["first", "second"]


def test_track_repeat_at_cap_still_accepted(
    client_with: ClientFactory, engine: Engine
) -> None:
    client = client_with(MAPPER_HELD_EVENTS_PER_VISITOR="1")
    _track(client, {"event": "first", "id": "retried"})

    response = _track(client, {"event": "first", "id": "retried"})

    assert response.status_code == 202
    assert len(events(engine)) == 1


def test_track_cap_only_for_anonymous(
    client_with: ClientFactory, engine: Engine, fake_ac: FakeAC
) -> None:
    client = client_with(MAPPER_HELD_EVENTS_PER_VISITOR="1")
    _identify(client, fake_ac)

    answers = [_track(client, {"event": f"e{n}"}).status_code for n in range(3)]

    assert answers == [202, 202, 202]


def test_track_expired_held_not_released(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    _track(client, {"event": "stale"})
    _track(client, {"event": "fresh"})
    week_ago = utcnow() - timedelta(days=7, seconds=1)
    with Session(engine) as session, session.begin():
        session.execute(
            update(Event).where(Event.name == "stale").values(received_at=week_ago)
        )

    _identify(client, fake_ac)

    assert [(e.name, e.status) for e in events(engine)] == [
        ("stale", "held"),
        ("fresh", "pending"),
    ]


def test_track_text_plain_accepted(client: TestClient, engine: Engine) -> None:
    response = client.post(
        "/track",
        content=json.dumps({"event": "beacon"}),
        headers={"Content-Type": "text/plain;charset=UTF-8", **FROM_SITE},
    )

    assert response.status_code == 202
    assert events(engine)[0].name == "beacon"


@pytest.mark.parametrize(
    ("data", "stored"),
    [
        pytest.param("plain text", "plain text", id="string"),
        pytest.param({"plan": "pro", "n": 2}, '{"plan":"pro","n":2}', id="object"),
        pytest.param([1, "two"], '[1,"two"]', id="list"),
        pytest.param(12.5, "12.5", id="number"),
        pytest.param(True, "true", id="bool"),
        pytest.param(None, None, id="null"),
        pytest.param([[{"a": [1]}]], '[[{"a":[1]}]]', id="nested"),
        pytest.param(
            json.loads("[" * 32 + "1" + "]" * 32),
            "[" * 32 + "1" + "]" * 32,
            id="32-deep",
        ),
        pytest.param("caf\u00e9", "caf\u00e9", id="unicode"),
    ],
)
def test_track_data_stored_as_text(
    client: TestClient, engine: Engine, data: object, stored: str | None
) -> None:
    _track(client, {"event": "e", "data": data})

    assert events(engine)[0].data == stored


def test_track_client_id_deduplicates(client: TestClient, engine: Engine) -> None:
    payload = {"event": "clicked", "id": "2f1c-retry-1"}

    first = _track(client, payload)
    second = _track(client, payload)

    assert (first.status_code, second.status_code) == (202, 202)
    assert len(events(engine)) == 1


def test_track_id_per_visitor(client: TestClient, engine: Engine) -> None:
    payload = {"event": "clicked", "id": "same-id"}

    _track(client, payload)
    client.cookies.clear()
    _track(client, payload)

    assert len(events(engine)) == 2


def test_track_32_char_name(client: TestClient, engine: Engine) -> None:
    response = _track(client, {"event": "n" * 32})

    assert response.status_code == 202


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        pytest.param(b"{not json", 400, "JSON", id="malformed"),
        pytest.param(b"\xff\xfe{}", 400, "UTF-8", id="not-utf8"),
        pytest.param(b"[1, 2]", 400, "object", id="array"),
        pytest.param(b'{"event": "a", "event": "b"}', 400, "once", id="repeated-key"),
        pytest.param(b'{"event": "e", "data": "a\\u0000b"}', 422, "NUL", id="nul"),
        pytest.param(
            b'{"event": "e", "data": ' + b"[" * 33 + b"]" * 33 + b"}",
            422,
            "32 deep",
            id="deeper-than-32",
        ),
        pytest.param(b'{"event": "e", "data": NaN}', 400, "JSON", id="nan"),
        pytest.param(b'{"event": "e", "data": -Infinity}', 400, "JSON", id="infinity"),
        pytest.param(b'{"event": "e", "data": 1e999}', 400, "JSON", id="overflow"),
        pytest.param(
            b'{"event": "e", "data": 1' + b"0" * 400 + b"}",
            400,
            "range of a double",
            id="huge-integer",
        ),
        pytest.param(
            b'{"event": "e", "data": [-1' + b"0" * 5000 + b"]}",
            400,
            "range of a double",
            id="integer-past-int-limit",
        ),
        pytest.param(
            b'{"event": "e", "data": ' + b"[" * 3000 + b"]" * 3000 + b"}",
            400,
            "nested",
            id="deep",
        ),
        pytest.param(
            b'{"event": "e", "data": "\\ud800"}', 422, '"data"', id="surrogate"
        ),
        pytest.param(
            b'{"event": "e", "data": ["\\udfff"]}', 422, '"data"', id="nested-surrogate"
        ),
        pytest.param(b"{}", 422, '"event"', id="no-event"),
        pytest.param(b'{"event": ""}', 422, '"event"', id="empty-event"),
        pytest.param(b'{"event": 5}', 422, '"event"', id="number-event"),
        pytest.param(json.dumps({"event": "n" * 33}).encode(), 422, "32", id="long"),
        pytest.param(b'{"event": "a<b"}', 422, '"event"', id="bad-chars"),
        pytest.param(b'{"event": " lead"}', 422, '"event"', id="leading-space"),
        pytest.param(b'{"event": "e", "id": 7}', 422, '"id"', id="number-id"),
        pytest.param(b'{"event": "e", "id": ""}', 422, '"id"', id="empty-id"),
        pytest.param(
            json.dumps({"event": "e", "id": "x" * 65}).encode(),
            422,
            '"id"',
            id="long-id",
        ),
    ],
)
def test_track_bad_body_refused(
    client: TestClient, engine: Engine, body: bytes, status: int, field: str
) -> None:
    response = client.post(
        "/track",
        content=body,
        headers={"Content-Type": "application/json", **FROM_SITE},
    )

    assert response.status_code == status
    assert field in response.json()["error"]
    assert events(engine) == []


def test_track_oversized_is_413(client: TestClient, engine: Engine) -> None:
    response = _track(client, {"event": "big", "data": "x" * 10_000})

    assert response.status_code == 413
    assert events(engine) == []


def test_track_streamed_oversize_413(client: TestClient, engine: Engine) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"event": "big", "data": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    response = client.post(
        "/track",
        content=chunks(),
        headers={"Content-Type": "application/json", **FROM_SITE},
    )

    assert response.status_code == 413
    assert events(engine) == []


def test_track_form_body_415(client: TestClient, engine: Engine) -> None:
    response = client.post("/track", data={"event": "x"}, headers=FROM_SITE)

    assert response.status_code == 415
    assert events(engine) == []


def test_track_foreign_origin_refused(client: TestClient, engine: Engine) -> None:
    response = _track(client, {"event": "csrf"}, Origin="https://evil.example")

    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    assert events(engine) == []


def test_track_no_origin_accepted(client: TestClient, engine: Engine) -> None:
    response = client.post(
        "/track", content=b'{"event": "server"}', headers={"Content-Type": "text/plain"}
    )

    assert response.status_code == 202
    assert len(events(engine)) == 1


def test_track_cors_allowed_origin(client: TestClient) -> None:
    response = _track(client, {"event": "cors"})

    headers = response.headers
    assert headers["access-control-allow-origin"] == "https://shop.example"
    assert headers["access-control-allow-credentials"] == "true"


def test_track_preflight_foreign_origin(client: TestClient) -> None:
    response = client.options(
        "/track",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
        },
    )

    assert response.json()["status"] == 400
    assert "access-control-allow-origin" not in response.headers


def test_track_preflight_allowed_origin(client: TestClient) -> None:
    response = client.options(
        "/track",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_track_tampered_cookie_anonymous(
    client: TestClient, engine: Engine, fake_ac: FakeAC
) -> None:
    _identify(client, fake_ac)
    forged = client.cookies["mapper_vid"][:-4] + "AAAA"
    client.cookies.clear()
    client.cookies.set("mapper_vid", forged, domain="mapper.shop.example")

    _track(client, {"event": "after-tamper"})

    assert [event.status for event in events(engine)] == ["held"]
    assert len(visitors(engine)) == 2


def test_track_fresh_cookie_kept(client: TestClient, engine: Engine) -> None:
    first = _track(client, {"event": "one"})
    second = _track(client, {"event": "two"})

    assert "Max-Age=34560000" in first.headers["set-cookie"]
    assert "set-cookie" not in second.headers
    assert len(visitors(engine)) == 1


def _track_with_cookie_aged(
    client: TestClient, engine: Engine, age: timedelta
) -> httpx2.Response:
    """Track once, then again with the visitor's cookie signed `age` ago."""
    _track(client, {"event": "one"})
    [visitor] = visitors(engine)
    signer = client.app.state.runtime.signer  # type: ignore[attr-defined]
    with freeze_time(utcnow() - age):
        aged = signer.sign(visitor.public_id)
    client.cookies.set("mapper_vid", aged, domain="mapper.shop.example")
    return _track(client, {"event": "two"})


@pytest.mark.parametrize(
    ("max_age", "age", "renewed"),
    [
        pytest.param("34560000", timedelta(hours=23), False, id="under-a-day"),
        pytest.param("34560000", timedelta(hours=25), True, id="over-a-day"),
        pytest.param("36000", timedelta(minutes=50), False, id="short-life-fresh"),
        pytest.param("36000", timedelta(minutes=70), True, id="short-life-tenth"),
    ],
)
def test_track_renews_by_age(
    client_with: ClientFactory,
    engine: Engine,
    max_age: str,
    age: timedelta,
    renewed: bool,
) -> None:
    client = client_with(MAPPER_COOKIE_MAX_AGE=max_age)

    response = _track_with_cookie_aged(client, engine, age)

    assert ("set-cookie" in response.headers) is renewed
    assert len(visitors(engine)) == 1


def test_track_erased_visitor_new_cookie(client: TestClient, engine: Engine) -> None:
    _track(client, {"event": "one"})
    with Session(engine) as session, session.begin():
        session.execute(delete(Visitor))

    response = _track(client, {"event": "two"})

    [visitor] = visitors(engine)
    signer = client.app.state.runtime.signer  # type: ignore[attr-defined]
    assert signer.read(response.cookies["mapper_vid"]).id == visitor.public_id
