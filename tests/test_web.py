"""What the endpoints share: the unknown-hash memory and bounded bodies."""

from __future__ import annotations

from starlette.testclient import TestClient

from mapper.web import UNKNOWN_HASH_LIMIT, UnknownHashes


def test_unknown_hashes_evict_oldest() -> None:
    cache = UnknownHashes()
    for number in range(UNKNOWN_HASH_LIMIT):
        cache.add(f"{number:032x}")

    cache.add("f" * 32)

    assert "f" * 32 in cache and f"{1:032x}" in cache
    assert f"{0:032x}" not in cache


def test_unknown_hashes_readd_refreshes() -> None:
    cache = UnknownHashes()
    cache.add("a" * 32)
    for number in range(1, UNKNOWN_HASH_LIMIT):
        cache.add(f"{number:032x}")

    cache.add("a" * 32)
    cache.add("f" * 32)

    assert "a" * 32 in cache
    assert f"{1:032x}" not in cache


def test_read_body_odd_length_header(client: TestClient) -> None:
    # "\xb2" is a superscript two in Latin-1, which str.isdigit() accepts.
    response = client.post(
        "/track",
        content=b'{"event": "e"}',
        headers={b"Content-Type": b"text/plain", b"Content-Length": b"\xb2"},
    )

    assert response.status_code == 202
