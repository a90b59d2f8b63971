"""Email normalization: one canonical form per address, or a refusal."""

from __future__ import annotations

import pytest

from mapper.emails import normalize_email
from mapper.errors import InvalidEmail


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("alice@example.com", "alice@example.com", id="plain"),
        pytest.param("  alice@example.com\n", "alice@example.com", id="trimmed"),
        pytest.param("Alice@EXAMPLE.Com", "Alice@example.com", id="domain-lowered"),
        pytest.param("bob@Bücher.de", "bob@xn--bcher-kva.de", id="idna-unicode"),
        pytest.param("bob@XN--BCHER-KVA.de", "bob@xn--bcher-kva.de", id="idna-ascii"),
    ],
)
def test_normalize_email_canonical_forms(raw: str, expected: str) -> None:
    assert normalize_email(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("alice", id="no-at"),
        pytest.param("alice@", id="no-domain"),
        pytest.param("alice@localhost", id="no-dot"),
        pytest.param("ali\u200bce@example.com", id="zero-width-space"),
        pytest.param("alice@exa\u202emple.com", id="bidi-override"),
        pytest.param("ali\u00adce@example.com", id="soft-hyphen"),
        pytest.param("ali ce@example.com", id="inner-space"),
        pytest.param("alice@example.com\x00", id="nul"),
        pytest.param("a" * 250 + "@example.com", id="too-long"),
    ],
)
def test_normalize_email_refuses_bad(raw: str) -> None:
    with pytest.raises(InvalidEmail):
        normalize_email(raw)


def test_normalize_email_hides_address() -> None:
    with pytest.raises(InvalidEmail) as caught:
        normalize_email("secret.person@@example.com")

    assert "secret.person" not in str(caught.value)
