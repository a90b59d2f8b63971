"""Planted identifiers must not come back in any answer or any log record.

Each request here carries an email, an AC hash or a secret where a careless
handler might echo it: in bad input, in errors, and in the normal path.
"""

from __future__ import annotations

import json
import logging

import httpx2
import pytest
from starlette.testclient import TestClient

from mapper.cli import configure_logging
from tests.conftest import SECRET_KEY, WEBHOOK_SECRET
from tests.fake_ac import FakeAC
from tests.helpers import FORM, contact_webhook

EMAIL = "planted.privacy@example.com"
HASH = "b1946ac92492d2347c6235b4d2611184"


def _requests(client: TestClient) -> list[httpx2.Response]:
    hook = f"/webhooks/activecampaign/{WEBHOOK_SECRET}"
    beacon = {"Content-Type": "text/plain", "Origin": "https://shop.example"}
    return [
        client.post(
            hook, content=contact_webhook("subscribe", email=EMAIL), headers=FORM
        ),
        client.post(hook, content=contact_webhook(email=EMAIL + "@"), headers=FORM),
        client.post(hook, content=contact_webhook(date_time=EMAIL), headers=FORM),
        client.post(hook, content=contact_webhook(contact_id=EMAIL), headers=FORM),
        client.post(
            f"/webhooks/activecampaign/{EMAIL}", content="type=x", headers=FORM
        ),
        client.get("/go", params={"h": HASH, "to": f"https://shop.example/?e={HASH}"}),
        client.get("/go", params={"h": EMAIL, "to": f"https://evil.example/{EMAIL}"}),
        client.post("/track", content=json.dumps({"event": EMAIL}), headers=beacon),
        client.post(
            "/track", content=json.dumps({"event": "e", "id": EMAIL}), headers=beacon
        ),
        client.post("/track", content=f'{{"event": "{HASH}"', headers=beacon),
        client.post(
            "/track", content=json.dumps({"event": "ok", "data": "x"}), headers=beacon
        ),
    ]


def test_no_identifier_in_answers_or_logs(
    client: TestClient, fake_ac: FakeAC, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
    configure_logging()
    caplog.set_level(logging.DEBUG, logger="mapper")

    responses = _requests(client)

    planted = [
        EMAIL,
        HASH,
        WEBHOOK_SECRET,
        SECRET_KEY,
        fake_ac.api_key,
        fake_ac.event_key,
    ]
    seen = [r.text + str(r.headers) for r in responses] + [caplog.text]
    for text in seen + [value for value in client.cookies.values()]:
        for value in planted:
            assert value not in text
    assert {r.status_code for r in responses} <= {200, 202, 302, 400, 401, 422}
