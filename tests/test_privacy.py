"""Planted identifiers must not come back in any answer or any log record.

Each request here carries an email, an AC hash or a secret where a careless
handler might echo it: in bad input, in errors, and in the normal path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx2
import pytest
from starlette.testclient import TestClient

from mapper.cli import QUIET_LOGGERS
from tests.fake_ac import FakeAC
from tests.helpers import FORM, ORIGIN, SECRET_KEY, WEBHOOK_URL, contact_webhook

EMAIL = "planted.privacy@example.com"
HASH = "b1946ac92492d2347c6235b4d2611184"
BEACON = {"Content-Type": "text/plain", "Origin": ORIGIN}


@pytest.fixture
def service_logging(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Log as `mapper serve` does: INFO and up, with httpx kept quiet."""
    caplog.set_level(logging.INFO)
    # The test's own client logs the URLs it requests; that is not mapper.
    quiet = QUIET_LOGGERS | {"httpx2": logging.WARNING}
    before = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def _webhooks(client: TestClient) -> list[httpx2.Response]:
    bodies = [
        contact_webhook("subscribe", email=EMAIL),
        contact_webhook(email=EMAIL + "@"),
        contact_webhook(date_time=EMAIL),
        contact_webhook(contact_id=EMAIL),
    ]
    answers = [client.post(WEBHOOK_URL, content=body, headers=FORM) for body in bodies]
    wrong = f"/webhooks/activecampaign/{EMAIL}"
    return answers + [client.post(wrong, content="type=x", headers=FORM)]


def _landings(client: TestClient) -> list[httpx2.Response]:
    return [
        client.get("/go", params={"h": HASH, "to": f"https://shop.example/?e={HASH}"}),
        client.get("/go", params={"h": EMAIL, "to": f"https://evil.example/{EMAIL}"}),
    ]


def _tracking(client: TestClient) -> list[httpx2.Response]:
    bodies = [
        json.dumps({"event": EMAIL}),
        json.dumps({"event": "e", "id": EMAIL}),
        f'{{"event": "{HASH}"',
        json.dumps({"event": "ok", "data": "x"}),
    ]
    return [client.post("/track", content=body, headers=BEACON) for body in bodies]


@pytest.mark.usefixtures("service_logging")
def test_privacy_sweep_finds_nothing(
    client: TestClient, fake_ac: FakeAC, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
    fake_ac.set_mode("down")
    _landings(client)
    fake_ac.set_mode("up")

    answers = _webhooks(client) + _landings(client) + _tracking(client)

    seen = [r.text + str(r.headers) for r in answers] + [caplog.text]
    seen += list(client.cookies.values())
    planted = [EMAIL, HASH, SECRET_KEY, fake_ac.api_key, fake_ac.event_key]
    assert [value for value in planted if any(value in text for text in seen)] == []
    assert {r.status_code for r in answers} <= {200, 202, 302, 400, 401, 422}
