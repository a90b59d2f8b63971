"""Visitor ids: random, signed, rotated, and refused when not genuine."""

from __future__ import annotations

import hashlib
import time

import pytest
from itsdangerous import TimestampSigner
from starlette.datastructures import Secret

from mapper.tokens import PREFIX, VisitorSigner, new_visitor_id

OLD, NEW = Secret("old-key-0123456789abcdef"), Secret("new-key-0123456789abcdef")


def test_new_visitor_id_is_random() -> None:
    ids = {new_visitor_id() for _ in range(1000)}

    assert len(ids) == 1000
    assert all(len(visitor_id) == 32 for visitor_id in ids)


def test_verify_round_trip() -> None:
    signer = VisitorSigner([NEW], max_age=60)
    visitor_id = new_visitor_id()

    assert signer.verify(signer.sign(visitor_id)) == visitor_id


def test_verify_accepts_rotated_key() -> None:
    before = VisitorSigner([OLD], max_age=60).sign(new_visitor_id())
    rotated = VisitorSigner([OLD, NEW], max_age=60)

    assert rotated.verify(before) is not None
    assert VisitorSigner([NEW], max_age=60).verify(before) is None


def test_sign_uses_newest_key() -> None:
    cookie = VisitorSigner([OLD, NEW], max_age=60).sign(new_visitor_id())

    assert VisitorSigner([NEW], max_age=60).verify(cookie) is not None


def _forged(key: Secret, salt: str, when: int | None = None) -> str:
    signer = TimestampSigner(str(key), salt=salt, digest_method=hashlib.sha256)
    if when is not None:
        signer.get_timestamp = lambda: when  # type: ignore[method-assign]
    return PREFIX + signer.sign(new_visitor_id()).decode()


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("garbage", id="garbage"),
        pytest.param(PREFIX + "a.b.c", id="bad-parts"),
        pytest.param(PREFIX + "\u00e9\u00e9.x.y", id="non-ascii"),
        pytest.param(_forged(NEW, "another-purpose"), id="foreign-salt"),
        pytest.param(_forged(Secret("someone-else-key-0123"), "x"), id="foreign-key"),
    ],
)
def test_verify_refuses_bad_cookie(cookie: str | None) -> None:
    assert VisitorSigner([NEW], max_age=60).verify(cookie) is None


def test_verify_refuses_tampered() -> None:
    signer = VisitorSigner([NEW], max_age=60)
    cookie = signer.sign(new_visitor_id())
    tampered = cookie[:-3] + ("AAA" if not cookie.endswith("AAA") else "BBB")

    assert signer.verify(tampered) is None


def test_verify_refuses_expired_and_future() -> None:
    signer = VisitorSigner([NEW], max_age=60)
    real = TimestampSigner(
        str(NEW), salt="mapper.visitor-cookie", digest_method=hashlib.sha256
    )
    now = int(time.time())

    def stamped(when: int) -> str:
        real.get_timestamp = lambda: when  # type: ignore[method-assign]
        return PREFIX + real.sign(new_visitor_id()).decode()

    assert signer.verify(stamped(now - 3600)) is None
    assert signer.verify(stamped(now + 3600)) is None
    assert signer.verify(stamped(now)) is not None


def test_signer_needs_a_key() -> None:
    with pytest.raises(ValueError, match="signing key"):
        VisitorSigner([], max_age=60)
