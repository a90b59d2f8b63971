"""Tests for the fake ActiveCampaign, spoken to over loopback with httpx.

Every email, hash and id here is made up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_ac import FakeAC

EMAIL = "alice@example.com"
HASH = "5f2b8c1e9a7d4c3b2a1908f7e6d5c4b3"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAC]:
    # One server for the module keeps the file fast; `fake` resets it per test.
    with FakeAC() as ac:
        ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
        yield ac


@pytest.fixture
def fake(server: FakeAC) -> FakeAC:
    server.set_mode("up")
    server.reset()
    return server


def event_form(ac: FakeAC, **changes: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {
        "actid": ac.actid,
        "key": ac.event_key,
        "event": "pricing_viewed",
        "eventdata": "plan=pro",
        "visit": json.dumps({"email": EMAIL}),
    }
    form.update(changes)
    return {name: value for name, value in form.items() if value is not None}


def send_event(ac: FakeAC, **changes: str | None) -> httpx.Response:
    return httpx.post(ac.track_url, data=event_form(ac, **changes), headers=FORM)


def view_hash(ac: FakeAC, value: str, api_key: str | None = None) -> Any:
    params = {
        "api_action": "contact_view_hash",
        "api_key": api_key or ac.api_key,
        "api_output": "json",
        "hash": value,
    }
    return httpx.get(f"{ac.url}/admin/api.php", params=params).json()


def get_v3(ac: FakeAC, path: str, **params: str) -> httpx.Response:
    headers = {"Api-Token": ac.api_key}
    return httpx.get(f"{ac.url}/api/3/{path}", params=params, headers=headers)


def test_event_valid_form_spawned(fake: FakeAC) -> None:
    response = send_event(fake)

    assert response.json() == {"success": 1, "message": "Event spawned"}
    assert fake.events() == [event_form(fake)]


def test_event_missing_actid_refused(fake: FakeAC) -> None:
    response = send_event(fake, actid=None)

    assert response.status_code == 200
    assert response.json() == {
        "success": 0,
        "message": "An account ID must be provided.",
    }


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"key": "0" * 40}, id="wrong-key"),
        pytest.param({"actid": "999"}, id="wrong-actid"),
        pytest.param({"event": None}, id="no-event"),
        pytest.param({"event": "e" * 33}, id="name-over-32"),
        pytest.param({"visit": None, "visit[email]": EMAIL}, id="nested-visit"),
        pytest.param({"visit": EMAIL}, id="visit-not-json"),
        pytest.param({"visit": '{"email": 7}'}, id="email-not-string"),
    ],
)
def test_event_bad_form_refused(fake: FakeAC, changes: dict[str, str | None]) -> None:
    response = send_event(fake, **changes)

    assert response.json()["success"] == 0
    assert fake.events() == []


def test_event_name_of_32_accepted(fake: FakeAC) -> None:
    response = send_event(fake, event="e" * 32)

    assert response.json()["success"] == 1


def test_event_json_body_gets_400(fake: FakeAC) -> None:
    response = httpx.post(fake.track_url, json=event_form(fake))

    assert response.status_code == 400
    assert response.json() == {}
    assert fake.requests[0].form == {}


def test_hash_lookup_found_top_level(fake: FakeAC) -> None:
    answer = view_hash(fake, HASH)

    assert answer["result_code"] == 1
    assert (answer["id"], answer["email"], answer["hash"]) == ("42", EMAIL, HASH)


def test_hash_lookup_unknown_fails(fake: FakeAC) -> None:
    answer = view_hash(fake, "0" * 32)

    assert answer == {
        "result_code": 0,
        "result_message": "Failed: Nothing is returned",
        "result_output": "json",
    }


def test_hash_lookup_wrong_key_unauthorized(fake: FakeAC) -> None:
    answer = view_hash(fake, HASH, api_key="wrong")

    assert answer["result_code"] == 0
    assert answer["result_message"] == "You are not authorized to access this file"


def test_v1_other_action_fails(fake: FakeAC) -> None:
    params = {"api_action": "user_me", "api_key": fake.api_key, "api_output": "json"}
    answer = httpx.get(f"{fake.url}/admin/api.php", params=params).json()

    assert answer["result_code"] == 0


def test_v3_contact_by_id(fake: FakeAC) -> None:
    contact = get_v3(fake, "contacts/42").json()["contact"]

    assert (contact["id"], contact["email"], contact["hash"]) == ("42", EMAIL, HASH)


def test_v3_contact_unknown_id_404(fake: FakeAC) -> None:
    response = get_v3(fake, "contacts/7")

    assert response.status_code == 404
    assert response.json() == {"message": "No Result found for Subscriber with id 7"}


def test_v3_contacts_by_email(fake: FakeAC) -> None:
    answer = get_v3(fake, "contacts", email=EMAIL).json()

    assert [contact["hash"] for contact in answer["contacts"]] == [HASH]
    assert answer["meta"] == {"total": "1", "page_input": {"limit": 20, "offset": 0}}


def test_v3_contacts_unknown_email_empty(fake: FakeAC) -> None:
    answer = get_v3(fake, "contacts", email="nobody@example.com").json()

    assert answer["contacts"] == []
    assert answer["meta"]["total"] == "0"


@pytest.mark.parametrize("token", [None, "wrong"], ids=["missing", "wrong"])
def test_v3_bad_token_forbidden(fake: FakeAC, token: str | None) -> None:
    headers = {"Api-Token": token} if token else {}
    response = httpx.get(f"{fake.url}/api/3/contacts/42", headers=headers)

    assert response.status_code == 403
    assert response.json() == {"message": "Forbidden"}


def test_mode_down_refuses_then_returns(fake: FakeAC) -> None:
    url = fake.url
    fake.set_mode("down")

    with pytest.raises(httpx.ConnectError):
        send_event(fake)

    fake.set_mode("up")

    assert fake.url == url
    assert send_event(fake).json()["success"] == 1


def test_mode_slow_waits_then_answers(fake: FakeAC) -> None:
    fake.set_mode("slow", delay=0.3)

    started = time.monotonic()
    response = send_event(fake)

    assert time.monotonic() - started >= 0.3
    assert response.json()["success"] == 1


def test_mode_rate_limit_answers_429(fake: FakeAC) -> None:
    fake.set_mode("rate_limit", retry_after=7)

    response = get_v3(fake, "contacts/42")

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["ratelimit-remaining"] == "0"


def test_mode_unavailable_answers_503(fake: FakeAC) -> None:
    fake.set_mode("unavailable")

    response = send_event(fake)

    assert response.status_code == 503
    assert "retry-after" not in response.headers
    assert fake.events() == []


def test_mode_html_answers_maintenance(fake: FakeAC) -> None:
    fake.set_mode("html")

    response = send_event(fake)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert fake.events() == []


def test_mode_error_answers_500(fake: FakeAC) -> None:
    fake.set_mode("error")

    response = httpx.get(f"{fake.url}/admin/api.php")

    assert response.status_code == 500
    assert fake.requests[0].status == 500


def test_set_mode_unknown_raises(fake: FakeAC) -> None:
    with pytest.raises(ValueError, match="Expected a mode"):
        fake.set_mode("sideways")


def test_control_mode_over_http(fake: FakeAC) -> None:
    control = f"{fake.url}/_fake/mode"
    httpx.post(control, json={"mode": "rate_limit", "retry_after": 3})

    assert get_v3(fake, "contacts/42").headers["retry-after"] == "3"

    httpx.post(control, json={"mode": "up"})

    assert get_v3(fake, "contacts/42").status_code == 200


def test_control_mode_down_refused(fake: FakeAC) -> None:
    response = httpx.post(f"{fake.url}/_fake/mode", json={"mode": "down"})

    assert response.status_code == 400
    assert send_event(fake).json()["success"] == 1


def test_control_contacts_stats_reset(fake: FakeAC) -> None:
    contact = {"contact_id": "43", "email": "bob@example.com", "hash": "b" * 32}
    httpx.post(f"{fake.url}/_fake/contacts", json=contact)
    view_hash(fake, "b" * 32)
    send_event(fake)

    stats = httpx.get(f"{fake.url}/_fake/stats").json()

    assert stats == {"events": 1, "lookups": 1, "requests": 2}

    httpx.post(f"{fake.url}/_fake/reset")

    assert fake.requests == []
    assert fake.events() == []


def test_lookups_counts_both_apis(fake: FakeAC) -> None:
    view_hash(fake, HASH)
    get_v3(fake, "contacts/42")
    get_v3(fake, "contacts", email=EMAIL)
    get_v3(fake, "contacts/42/trackingLogs")
    send_event(fake)

    assert fake.lookups() == 3


def test_requests_recorded_in_order(fake: FakeAC) -> None:
    send_event(fake, key="wrong")
    get_v3(fake, "contacts/7")

    recorded = fake.requests

    assert [(r.method, r.path, r.status) for r in recorded] == [
        ("POST", "/event", 200),
        ("GET", "/api/3/contacts/7", 404),
    ]
    assert recorded[0].form["key"] == "wrong"
    assert recorded[1].headers["api-token"] == fake.api_key


def test_cli_prints_url_and_serves() -> None:
    command = [sys.executable, "-m", "tests.fake_ac", "--actid", "1"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as cli:
        assert cli.stdout is not None
        try:
            url = cli.stdout.readline().strip()
            stats = httpx.get(f"{url}/_fake/stats").json()
        finally:
            cli.terminate()

    assert cli.returncode == 0
    assert stats == {"events": 0, "lookups": 0, "requests": 0}
