"""Visitor IDs: random, opaque, and signed into the first-party cookie.

The cookie holds only the visitor's random id and a signature, never an
email or AC hash, so what the browser keeps identifies nobody outside
mapper's own database.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NewType

from itsdangerous import BadSignature, TimestampSigner
from starlette.datastructures import Secret

VisitorId = NewType("VisitorId", str)

# A typed prefix tells a mapper cookie apart from any other signed value.
PREFIX = "mv1."
# One salt per purpose: a signature made for a visitor cookie is worth
# nothing anywhere else the same keys are used.
VISITOR_SALT = "mapper.visitor-cookie"
ID_BYTES = 24


@dataclass(frozen=True)
class SignedVisitor:
    """A visitor id from a good cookie, and when that cookie was signed."""

    id: VisitorId
    signed_at: datetime


def make_visitor_id() -> VisitorId:
    """Return a fresh visitor id of 192 random bits, URL-safe."""
    return VisitorId(secrets.token_urlsafe(ID_BYTES))


class VisitorSigner:
    """Signs visitor ids for the cookie and verifies them on the way back.

    `keys` is ordered oldest to newest: the newest signs, every key
    verifies, so a key can be rotated in without logging visitors out.
    """

    def __init__(self, keys: Sequence[Secret], *, max_age: int) -> None:
        if not keys:
            raise ValueError("Expected at least one signing key.")
        self._signer = TimestampSigner(
            [str(key) for key in keys],
            salt=VISITOR_SALT,
            digest_method=hashlib.sha256,
        )
        self.max_age = max_age

    def sign(self, visitor_id: VisitorId) -> str:
        """Return the cookie value for `visitor_id`, stamped with now."""
        return PREFIX + self._signer.sign(visitor_id).decode("ascii")

    def read(self, cookie: str | None) -> SignedVisitor | None:
        """Return the visitor in a cookie value, or None if it is not good.

        Tampered, foreign, expired, future-dated and garbage values all give
        None, with no hint of which check failed.
        """
        if not cookie or not cookie.startswith(PREFIX) or not cookie.isascii():
            return None
        try:
            value, signed_at = self._signer.unsign(
                cookie.removeprefix(PREFIX), max_age=self.max_age, return_timestamp=True
            )
        except BadSignature:
            return None
        return SignedVisitor(VisitorId(value.decode("ascii")), signed_at)
