"""The app's own routes and its error shape."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from mapper.app import create_app
from mapper.errors import SettingsError
from tests.conftest import make_settings


def test_snippet_served_as_javascript(client: TestClient) -> None:
    response = client.get("/mapper.js")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert "sendBeacon" in response.text and "document.cookie" not in response.text


def test_healthz_answers_ok(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_unknown_path_json_404(client: TestClient) -> None:
    response = client.get("/nowhere")

    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "status": 404}


def test_wrong_method_json_405(client: TestClient) -> None:
    response = client.get("/track")

    assert response.json() == {"error": "Method Not Allowed", "status": 405}


def test_server_error_says_nothing(client: TestClient) -> None:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    runtime.sessions = None
    safe = TestClient(client.app, raise_server_exceptions=False)

    response = safe.post(
        "/track", content=b'{"event": "e"}', headers={"Content-Type": "text/plain"}
    )

    assert response.status_code == 500
    assert response.json() == {"error": "Internal Server Error", "status": 500}


def test_create_app_needs_secret_keys(database_url: str) -> None:
    settings = make_settings(database_url, None, MAPPER_SECRET_KEYS="")

    with pytest.raises(SettingsError, match="MAPPER_SECRET_KEYS"):
        create_app(settings)


def test_cors_never_wildcard(database_url: str) -> None:
    settings = make_settings(database_url, None, MAPPER_ALLOWED_ORIGINS="*")
    app = create_app(settings, deliver=False)

    with TestClient(app) as local:
        response = local.post(
            "/track",
            content=b'{"event": "e"}',
            headers={"Content-Type": "text/plain", "Origin": "https://any.example"},
        )

    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
