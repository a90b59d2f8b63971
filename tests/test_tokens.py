"""Visitor ids: random, signed, rotated, and refused when not genuine."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from freezegun import freeze_time
from itsdangerous import TimestampSigner
from starlette.datastructures import Secret

from mapper.tokens import PREFIX, VisitorId, VisitorSigner, make_visitor_id

OLD = Secret("old-key-0123456789abcdef")
NEW = Secret("new-key-0123456789abcdef")
DAY = 24 * 3600


def test_make_visitor_id_random() -> None:
    ids = {make_visitor_id() for _ in range(1000)}

    assert len(ids) == 1000
    assert {len(visitor_id) for visitor_id in ids} == {32}


def test_read_round_trip() -> None:
    signer = VisitorSigner([NEW], max_age=DAY)
    visitor_id = make_visitor_id()

    signed = signer.read(signer.sign(visitor_id))

    assert signed is not None and signed.id == visitor_id


def test_read_accepts_rotated_key() -> None:
    before = VisitorSigner([OLD], max_age=DAY).sign(make_visitor_id())

    assert VisitorSigner([OLD, NEW], max_age=DAY).read(before) is not None
    assert VisitorSigner([NEW], max_age=DAY).read(before) is None


def test_sign_uses_newest_key() -> None:
    cookie = VisitorSigner([OLD, NEW], max_age=DAY).sign(make_visitor_id())

    assert VisitorSigner([NEW], max_age=DAY).read(cookie) is not None


def _signed_elsewhere(key: Secret, salt: str) -> str:
    signer = TimestampSigner(str(key), salt=salt, digest_method=hashlib.sha256)
    return PREFIX + signer.sign(make_visitor_id()).decode()


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("garbage", id="garbage"),
        pytest.param(PREFIX + "a.b.c", id="bad-parts"),
        pytest.param(PREFIX + "\u00e9\u00e9.x.y", id="non-ascii"),
        pytest.param(_signed_elsewhere(NEW, "another-purpose"), id="foreign-salt"),
        pytest.param(
            _signed_elsewhere(Secret("someone-else-0123"), "x"), id="foreign-key"
        ),
    ],
)
def test_read_refuses_bad_cookie(cookie: str | None) -> None:
    assert VisitorSigner([NEW], max_age=DAY).read(cookie) is None


def test_read_refuses_tampered() -> None:
    signer = VisitorSigner([NEW], max_age=DAY)
    cookie = signer.sign(make_visitor_id())
    tampered = cookie[:-3] + ("AAA" if not cookie.endswith("AAA") else "BBB")

    assert signer.read(tampered) is None


@pytest.mark.parametrize(
    ("signed_at", "valid"),
    [
        pytest.param("2026-01-01 11:00", True, id="fresh"),
        pytest.param("2025-12-30 11:00", False, id="expired"),
        pytest.param("2026-01-01 13:00", False, id="future-dated"),
    ],
)
def test_read_checks_age(signed_at: str, valid: bool) -> None:
    signer = VisitorSigner([NEW], max_age=DAY)
    with freeze_time(signed_at):
        cookie = signer.sign(make_visitor_id())

    with freeze_time("2026-01-01 12:00"):
        verified = signer.read(cookie)

    assert (verified is not None) is valid


def test_signer_needs_a_key() -> None:
    with pytest.raises(ValueError, match="signing key"):
        VisitorSigner([], max_age=DAY)


def test_read_gives_signing_time() -> None:
    signer = VisitorSigner([NEW], max_age=DAY)
    with freeze_time("2026-01-01 11:00"):
        cookie = signer.sign(VisitorId("some-visitor"))

    with freeze_time("2026-01-01 12:00"):
        signed = signer.read(cookie)

    assert signed is not None
    assert signed.signed_at == datetime(2026, 1, 1, 11, 0, tzinfo=UTC)
