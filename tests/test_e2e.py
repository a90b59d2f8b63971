"""The whole path with real processes: `mapper serve`, the fake AC, and an
HTTP client that keeps cookies like a browser.

AC webhooks fill the mapping, an email link identifies the visitor, tracked
events reach the fake AC with the contact's email, and nothing the client
received or the service logged holds an identifier.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from mapper.models import utcnow
from tests.fake_ac import FakeAC
from tests.helpers import FORM, ORIGIN, SITE, ac_env, contact_webhook, wait_until
from tests.service import SECRET_KEY, WEBHOOK_SECRET, MapperProcess

EMAIL = "planted.person@example.com"
HASH = "9e107d9d372bb6826bd81d3542a419d6"
WEBHOOK_PATH = f"/webhooks/activecampaign/{WEBHOOK_SECRET}"
EVENT_COUNT = 1000


def _start_fake_ac() -> FakeAC:
    fake = FakeAC()
    fake.start()
    fake.add_contact(contact_id="42", email=EMAIL, hash=HASH)
    return fake


def _mapper_env(fake: FakeAC) -> dict[str, str]:
    return ac_env(fake) | {
        "MAPPER_ALLOWED_HOSTS": SITE,
        "MAPPER_ALLOWED_ORIGINS": ORIGIN,
        "MAPPER_DELIVERY_BATCH_SIZE": "100",
        # The fake AC has no rate limit; the cap's own tests are elsewhere.
        "MAPPER_AC_RATE_LIMIT": "10000",
    }


@pytest.fixture
def fake_ac() -> Iterator[FakeAC]:
    fake = _start_fake_ac()
    yield fake
    fake.stop()


@pytest.fixture
def mapper(tmp_path: Path, fake_ac: FakeAC) -> Iterator[MapperProcess]:
    with MapperProcess(tmp_path, _mapper_env(fake_ac)) as process:
        yield process


class Recorder:
    """Keeps every response the client received, for the privacy sweep."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        self.seen.extend(f"{key}: {value}" for key, value in response.headers.items())
        self.seen.append(response.text)


def _contact_rows(mapper: MapperProcess) -> list[tuple[str, str]]:
    with sqlite3.connect(mapper.folder / "mapper.db") as db:
        rows = db.execute("SELECT ac_contact_id, email FROM contacts").fetchall()
    return [(str(row[0]), str(row[1])) for row in rows]


def _webhook(mapper: MapperProcess, body: str) -> httpx.Response:
    # AC is not the browser: its requests stay out of the browser's record.
    return httpx.post(mapper.url + WEBHOOK_PATH, content=body, headers=FORM)


def _track_many(browser: httpx.Client, count: int) -> None:
    headers = {"Origin": ORIGIN, "Content-Type": "text/plain"}
    for number in range(count):
        body = f'{{"event": "viewed_page", "data": "page {number}", "id": "e{number}"}}'
        assert browser.post("/track", content=body, headers=headers).status_code == 202


@dataclass(frozen=True)
class Journey:
    """What one browser's visit left behind, for the tests to inspect."""

    seen: list[str]
    log: str
    delivered: list[dict[str, str]]
    lookups: int
    fake: FakeAC


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journey]:
    """A webhook, an email link, then many events from the same browser."""
    fake = _start_fake_ac()
    mapper = MapperProcess(tmp_path_factory.mktemp("journey"), _mapper_env(fake))
    recorder = Recorder()
    try:
        mapper.start()
        with httpx.Client(
            base_url=mapper.url, event_hooks={"response": [recorder]}
        ) as browser:
            _webhook(mapper, contact_webhook("subscribe", email=EMAIL))
            browser.get("/go", params={"h": HASH, "to": f"{ORIGIN}/welcome?a=1"})
            fake.reset()
            _track_many(browser, EVENT_COUNT)
            wait_until(lambda: len(fake.events()) >= EVENT_COUNT)
    finally:
        mapper.stop()
        fake.stop()
    yield Journey(recorder.seen, mapper.log(), fake.events(), fake.lookups(), fake)


def test_e2e_redirect_clean(journey: Journey) -> None:
    locations = [text for text in journey.seen if text.startswith("location: ")]

    assert locations == [f"location: {ORIGIN}/welcome?a=1"]


def test_e2e_events_reach_ac(journey: Journey) -> None:
    delivered = journey.delivered

    assert len(delivered) == EVENT_COUNT
    assert delivered[0] == {
        "actid": journey.fake.actid,
        "key": journey.fake.event_key,
        "event": "viewed_page",
        "eventdata": "page 0",
        "visit": f'{{"email": "{EMAIL}"}}',
    }


def test_e2e_no_lookups(journey: Journey) -> None:
    assert journey.lookups == 0


def test_e2e_nothing_leaks(journey: Journey) -> None:
    fake = journey.fake
    planted = [EMAIL, quote(EMAIL), HASH, fake.event_key, fake.api_key]
    planted += [SECRET_KEY, WEBHOOK_SECRET]

    texts = journey.seen + [journey.log]

    assert [value for value in planted if any(value in text for text in texts)] == []


def test_e2e_concurrent_webhooks(mapper: MapperProcess) -> None:
    body = contact_webhook("subscribe", email=EMAIL)
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def deliver() -> None:
        barrier.wait()
        statuses.append(_webhook(mapper, body).status_code)

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * 6
    assert _contact_rows(mapper) == [("42", EMAIL)]


def test_e2e_renamed_contact(mapper: MapperProcess, fake_ac: FakeAC) -> None:
    new_email = "planted.renamed@example.com"
    with httpx.Client(base_url=mapper.url) as browser:
        browser.get("/go", params={"h": HASH, "to": f"{ORIGIN}/"})
        renamed = contact_webhook(email=new_email, date_time=utcnow().isoformat())
        _webhook(mapper, renamed)

        browser.post(
            "/track",
            content=b'{"event": "renamed"}',
            headers={"Content-Type": "text/plain"},
        )

    wait_until(fake_ac.events)
    assert fake_ac.events()[0]["visit"] == f'{{"email": "{new_email}"}}'


def test_e2e_logs_lifecycle(journey: Journey) -> None:
    assert "mapper is starting." in journey.log
    assert "mapper has stopped." in journey.log
