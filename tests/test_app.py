"""The app's own routes, its error shape, and its guard against leaks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from mapper.app import create_app
from mapper.db import make_engine
from mapper.errors import SafeErrors, SettingsError, describe_exception
from mapper.settings import Settings
from tests.helpers import EMAIL, make_settings

BEACON = {"Content-Type": "text/plain"}


def test_snippet_is_javascript(client: TestClient) -> None:
    response = client.get("/mapper.js")

    assert response.headers["content-type"].startswith("text/javascript")
    assert "sendBeacon" in response.text


def test_snippet_leaves_cookie_alone(client: TestClient) -> None:
    assert "document.cookie" not in client.get("/mapper.js").text


def test_healthz_answers_ok(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_unknown_path_json_404(client: TestClient) -> None:
    response = client.get("/nowhere")

    assert response.json() == {"error": "Not Found", "status": 404}


def test_wrong_method_json_405(client: TestClient) -> None:
    response = client.get("/track")

    assert response.json() == {"error": "Method Not Allowed", "status": 405}
    assert response.headers["allow"] == "POST"


def test_database_down_bare_500(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = make_engine("sqlite:////nonexistent/dir/mapper.db")
    app = create_app(settings, engine=unreachable, deliver=False)

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/track", content=b'{"event": "e"}', headers={"Content-Type": "text/plain"}
        )

    assert response.json() == {"error": "Internal Server Error", "status": 500}
    assert "OperationalError at store.py" in caplog.text


async def _fails_with_email(request: Request) -> None:
    raise RuntimeError(f"Key (email)=({EMAIL}) already exists.")


def test_safe_errors_log_no_message(caplog: pytest.LogCaptureFixture) -> None:
    app = Starlette(routes=[Route("/boom", _fails_with_email)])
    app.add_middleware(SafeErrors)

    with caplog.at_level(logging.DEBUG):
        response = TestClient(app, raise_server_exceptions=False).get("/boom")

    assert response.status_code == 500
    assert "RuntimeError" in caplog.text and "test_app.py" in caplog.text
    assert EMAIL not in caplog.text + response.text


def test_create_app_needs_secret_keys(database_url: str) -> None:
    settings = make_settings(database_url, None, MAPPER_SECRET_KEYS="")

    with pytest.raises(SettingsError, match="MAPPER_SECRET_KEYS"):
        create_app(settings)


def test_app_disposes_own_engine(settings: Settings) -> None:
    app = create_app(settings, deliver=False)
    engine = app.state.runtime.engine

    with TestClient(app) as client:
        client.post("/track", content=b'{"event": "e"}', headers=BEACON)
        pooled_while_up = engine.pool.checkedin()

    assert (pooled_while_up, engine.pool.checkedin()) == (1, 0)


async def _client_went_away(request: Request) -> None:
    raise ClientDisconnect()


def test_safe_errors_ignore_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    app = Starlette(routes=[Route("/gone", _client_went_away)])
    app.add_middleware(SafeErrors)

    with caplog.at_level(logging.DEBUG, logger="mapper"):
        TestClient(app, raise_server_exceptions=False).get("/gone")

    assert caplog.text == ""


async def _fails_mid_stream(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"partial"
        raise RuntimeError(EMAIL)

    return StreamingResponse(chunks())


def test_safe_errors_after_start(caplog: pytest.LogCaptureFixture) -> None:
    app = Starlette(routes=[Route("/stream", _fails_mid_stream)])
    app.add_middleware(SafeErrors)

    with caplog.at_level(logging.ERROR):
        response = TestClient(app, raise_server_exceptions=False).get("/stream")

    assert response.content == b"partial"
    assert EMAIL not in caplog.text


def test_describe_exception_without_traceback() -> None:
    assert describe_exception(RuntimeError(EMAIL)) == "RuntimeError"
