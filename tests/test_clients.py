"""Reading AC's answers: hash lookups and event posts."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from mapper.clients import (
    ACClient,
    DeliveryResult,
    Outcome,
    RateLimiter,
    parse_retry_after,
    read_track_answer,
    read_view_answer,
)
from mapper.errors import ACUnavailable
from tests.fake_ac import FakeAC
from tests.helpers import make_settings

HASH = "5f2b8c1e9a7d4c3b2a1908f7e6d5c4b3"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="empty"),
        pytest.param([], id="list"),
        pytest.param("text", id="string"),
    ],
)
def test_view_without_result_code_unavailable(body: object) -> None:
    with pytest.raises(ACUnavailable):
        read_view_answer(body, HASH)


def test_view_accepts_integer_id() -> None:
    answer = {"result_code": 1, "id": 42, "email": "a@EXAMPLE.com", "hash": HASH}

    found = read_view_answer(answer, HASH)

    assert found is not None
    assert (found.ac_contact_id, found.email) == ("42", "a@example.com")


def _response(status: int, body: object = None, **headers: str) -> httpx.Response:
    if body is None:
        return httpx.Response(status, text="<html>busy</html>", headers=headers)
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("response", "outcome"),
    [
        pytest.param(
            _response(200, {"success": 1, "message": "Event spawned"}),
            "delivered",
            id="spawned",
        ),
        pytest.param(_response(200, {"success": "1"}), "refused", id="string-one"),
        pytest.param(_response(200, {"success": True}), "refused", id="true"),
        pytest.param(
            _response(200, {"success": 0, "message": "No"}), "refused", id="zero"
        ),
        pytest.param(_response(400, {}), "refused", id="documented-400"),
        pytest.param(
            _response(
                200, {"success": 0, "message": "An account ID must be provided."}
            ),
            "misconfigured",
            id="missing-actid",
        ),
        pytest.param(
            _response(200, {"success": 0, "message": "Event tracking is disabled"}),
            "misconfigured",
            id="tracking-off",
        ),
        pytest.param(_response(403, {}), "misconfigured", id="forbidden"),
        pytest.param(_response(404, {"message": "x"}), "misconfigured", id="wrong-url"),
        pytest.param(_response(404), "misconfigured", id="wrong-url-html"),
        pytest.param(
            _response(200, {"success": 0, "message": "Contact account closed"}),
            "refused",
            id="other-account",
        ),
        pytest.param(
            _response(200, {"success": 0, "message": "Monkeys"}),
            "refused",
            id="key-inside-a-word",
        ),
        pytest.param(_response(201, {"success": 1}), "refused", id="not-200"),
        pytest.param(_response(200), "retry", id="html"),
        pytest.param(_response(502), "retry", id="bad-gateway"),
        pytest.param(_response(429, {}), "retry", id="rate-limited"),
    ],
)
def test_track_answers_classified(response: httpx.Response, outcome: str) -> None:
    assert read_track_answer(response).outcome == outcome


def test_track_refusal_keeps_message() -> None:
    answer = _response(200, {"success": 0, "message": "Invalid key."})

    assert read_track_answer(answer).message == "Invalid key."


def test_retry_after_seconds() -> None:
    moment = parse_retry_after("30")

    assert moment is not None
    assert timedelta(seconds=29) < moment - datetime.now(UTC) <= timedelta(seconds=30)


def test_retry_after_http_date() -> None:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)

    moment = parse_retry_after(later.strftime("%a, %d %b %Y %H:%M:%S GMT"))

    assert moment == later


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="absent"),
        pytest.param("soon", id="word"),
        pytest.param("-5", id="negative"),
        pytest.param("", id="empty"),
        pytest.param("\u00b2", id="superscript"),
    ],
)
def test_retry_after_unreadable(value: str | None) -> None:
    assert parse_retry_after(value) is None


def test_retry_after_past_date_is_now() -> None:
    moment = parse_retry_after("Mon, 01 Jan 2001 00:00:00 -0000")

    assert moment is not None
    assert abs(moment - datetime.now(UTC)) < timedelta(seconds=5)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("86400", id="a-day"),
        pytest.param("9" * 30, id="huge"),
        pytest.param("Fri, 01 Jan 2100 00:00:00 GMT", id="far-date"),
    ],
)
def test_retry_after_capped_at_hour(value: str) -> None:
    moment = parse_retry_after(value)

    assert moment is not None
    assert moment - datetime.now(UTC) <= timedelta(hours=1)


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
def test_view_refuses_odd_answers(answer: dict[str, object]) -> None:
    assert read_view_answer(answer, HASH) is None


def test_view_refused_key_unavailable() -> None:
    answer = {
        "result_code": 0,
        "result_message": "You are not authorized to access this file",
    }

    with pytest.raises(ACUnavailable):
        read_view_answer(answer, HASH)


def test_rate_limiter_spaces_calls() -> None:
    limiter = RateLimiter(20)

    async def five_calls() -> list[float]:
        moments = []
        for _ in range(5):
            await limiter.wait()
            moments.append(time.monotonic())
        return moments

    moments = asyncio.run(five_calls())

    gaps = [b - a for a, b in zip(moments, moments[1:], strict=False)]
    assert min(gaps) >= 0.04


def test_rate_limiter_first_call_waits_not() -> None:
    # One call per 100 s: a first call that waited would time out.
    limiter = RateLimiter(0.01)

    asyncio.run(asyncio.wait_for(limiter.wait(), timeout=10))


def test_rate_limiter_urgent_goes_first() -> None:
    limiter = RateLimiter(10)
    order: list[str] = []

    async def take(name: str, urgent: bool) -> None:
        await limiter.wait(urgent=urgent)
        order.append(name)

    async def queue_up() -> None:
        await limiter.wait()
        # Background sends asked first; the lookup still gets the next turn.
        background = [asyncio.create_task(take(f"send{n}", False)) for n in range(3)]
        await asyncio.sleep(0)
        await take("lookup", True)
        await asyncio.gather(*background)

    asyncio.run(queue_up())

    assert order[0] == "lookup"


def test_send_event_pools_not_capping(fake_ac: FakeAC) -> None:
    # 20 sends at once need three pools of 8 connections; one would hold
    # 12 of them back until others ended.
    settings = make_settings(
        "sqlite:///unused.db", fake_ac, MAPPER_DELIVERY_CONCURRENCY="20"
    )
    fake_ac.set_mode("slow", delay=0.3)

    async def send_together() -> list[DeliveryResult]:
        client = ACClient(settings)
        try:
            sends = (
                client.send_event(email=f"p{n}@example.com", name="pooled", data=None)
                for n in range(20)
            )
            return await asyncio.gather(*sends)
        finally:
            await client.aclose()

    results = asyncio.run(send_together())

    assert {result.outcome for result in results} == {Outcome.DELIVERED}
    assert fake_ac.most_in_flight == 20
