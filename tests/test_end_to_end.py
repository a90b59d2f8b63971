"""The whole path with real processes: `mapper serve`, the fake AC, and an
HTTP client that keeps cookies like a browser.

AC webhooks fill the mapping, an email link identifies the visitor, tracked
events reach the fake AC with the contact's email, and nothing the client
received or the service logged holds an identifier.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.fake_ac import FakeAC
from tests.helpers import FORM, contact_webhook
from tests.service import SECRET_KEY, WEBHOOK_SECRET, MapperProcess

EMAIL = "planted.person@example.com"
HASH = "9e107d9d372bb6826bd81d3542a419d6"
SITE = "https://shop.example"
EVENT_COUNT = 1000


@pytest.fixture
def fake_ac() -> Iterator[FakeAC]:
    with FakeAC() as ac:
        ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
        yield ac


@pytest.fixture
def mapper(tmp_path: Path, fake_ac: FakeAC) -> Iterator[MapperProcess]:
    env = {
        "MAPPER_AC_API_URL": fake_ac.url,
        "MAPPER_AC_API_KEY": fake_ac.api_key,
        "MAPPER_AC_ACTID": fake_ac.actid,
        "MAPPER_AC_EVENT_KEY": fake_ac.event_key,
        "MAPPER_AC_TRACK_URL": fake_ac.track_url,
        "MAPPER_ALLOWED_HOSTS": "shop.example",
        "MAPPER_ALLOWED_ORIGINS": SITE,
        "MAPPER_DELIVERY_BATCH_SIZE": "100",
    }
    with MapperProcess(tmp_path, env) as process:
        yield process


class Recorder:
    """Keeps every response the client received, for the privacy sweep."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        self.seen.extend(f"{key}: {value}" for key, value in response.headers.items())
        self.seen.append(response.text)


def _wait_for(condition: object, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("Condition not met in time")


def _contact_rows(mapper: MapperProcess) -> list[tuple[str, str]]:
    with sqlite3.connect(mapper.folder / "mapper.db") as db:
        rows = db.execute("SELECT ac_contact_id, email FROM contacts").fetchall()
    return [(str(row[0]), str(row[1])) for row in rows]


def test_end_to_end_link_to_ac_event(mapper: MapperProcess, fake_ac: FakeAC) -> None:
    recorder = Recorder()
    browser = httpx.Client(base_url=mapper.url, event_hooks={"response": [recorder]})
    webhook = f"/webhooks/activecampaign/{WEBHOOK_SECRET}"

    answer = httpx.post(
        mapper.url + webhook,
        content=contact_webhook("subscribe", email=EMAIL),
        headers=FORM,
    )
    assert answer.status_code == 200

    landing = browser.get("/go", params={"h": HASH, "to": f"{SITE}/welcome?from=email"})
    assert landing.status_code == 302
    assert landing.headers["location"] == f"{SITE}/welcome?from=email"
    assert browser.cookies["mapper_vid"].startswith("mv1.")
    lookups_after_identify = fake_ac.lookups()

    headers = {"Origin": SITE, "Content-Type": "text/plain"}
    for number in range(EVENT_COUNT):
        body = f'{{"event": "viewed_page", "data": "page {number}", "id": "e{number}"}}'
        assert browser.post("/track", content=body, headers=headers).status_code == 202

    _wait_for(lambda: len(fake_ac.events()) >= EVENT_COUNT)
    delivered = fake_ac.events()
    assert len(delivered) == EVENT_COUNT
    assert delivered[0] == {
        "actid": fake_ac.actid,
        "key": fake_ac.event_key,
        "event": "viewed_page",
        "eventdata": "page 0",
        "visit": f'{{"email": "{EMAIL}"}}',
    }
    assert fake_ac.lookups() == lookups_after_identify == 1

    browser.close()
    mapper.stop()
    _sweep(recorder.seen + [mapper.log()], fake_ac)


def _sweep(texts: list[str], fake_ac: FakeAC) -> None:
    planted = [EMAIL, quote(EMAIL), HASH, fake_ac.event_key, fake_ac.api_key]
    planted += [SECRET_KEY, WEBHOOK_SECRET]
    for text in texts:
        for value in planted:
            assert value not in text, f"An identifier leaked into: {text[:80]!r}"


def test_end_to_end_concurrent_webhooks(mapper: MapperProcess) -> None:
    webhook = f"{mapper.url}/webhooks/activecampaign/{WEBHOOK_SECRET}"
    body = contact_webhook("subscribe", email=EMAIL)
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def deliver() -> None:
        barrier.wait()
        statuses.append(httpx.post(webhook, content=body, headers=FORM).status_code)

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * 6
    assert _contact_rows(mapper) == [("42", EMAIL)]


def test_end_to_end_update_changes_delivery_email(
    mapper: MapperProcess, fake_ac: FakeAC
) -> None:
    browser = httpx.Client(base_url=mapper.url)
    browser.get("/go", params={"h": HASH, "to": f"{SITE}/"})
    new_email = "planted.renamed@example.com"
    update = contact_webhook(email=new_email, date_time="2099-01-01T00:00:00Z")

    browser.post(
        f"/webhooks/activecampaign/{WEBHOOK_SECRET}", content=update, headers=FORM
    )
    browser.post(
        "/track",
        content=b'{"event": "after_rename"}',
        headers={"Content-Type": "text/plain"},
    )

    _wait_for(lambda: fake_ac.events())
    assert fake_ac.events()[0]["visit"] == f'{{"email": "{new_email}"}}'
    browser.close()


def test_serve_refuses_old_schema(tmp_path: Path) -> None:
    process = MapperProcess(tmp_path, {})

    result = process.run_cli("serve")

    assert result.returncode != 0
    assert "mapper db upgrade" in result.stderr


def test_serve_refuses_missing_secret(tmp_path: Path) -> None:
    process = MapperProcess(tmp_path, {"MAPPER_SECRET_KEYS": ""})
    process.run_cli("db", "upgrade")

    result = process.run_cli("serve")

    assert result.returncode != 0
    assert "MAPPER_SECRET_KEYS" in result.stderr


def test_cli_bad_setting_named(tmp_path: Path) -> None:
    process = MapperProcess(tmp_path, {"MAPPER_PORT": "eighty"})

    result = process.run_cli("db", "upgrade")

    assert result.returncode != 0
    assert "MAPPER_PORT must be a positive whole number" in result.stderr
    assert "eighty" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["serve", "--help"], "MAPPER_SECRET_KEYS", id="serve"),
        pytest.param(["db", "upgrade", "--help"], "MAPPER_DATABASE_URL", id="upgrade"),
        pytest.param(["--help"], "serve", id="main"),
    ],
)
def test_cli_help_names_settings(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result = MapperProcess(tmp_path, {}).run_cli(*args)

    assert result.returncode == 0
    assert expected in result.stdout
