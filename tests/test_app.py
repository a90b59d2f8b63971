"""The app's own routes, its error shape, and its guard against leaks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from alembic import command
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from mapper.app import create_app
from mapper.db import make_alembic_config, make_engine
from mapper.errors import SafeErrors, SettingsError, describe_exception
from mapper.settings import Settings
from tests.fake_ac import FakeAC
from tests.helpers import EMAIL, HASH, make_settings

BEACON = {"Content-Type": "text/plain"}


def test_snippet_is_javascript(client: TestClient) -> None:
    response = client.get("/mapper.js")

    assert response.headers["content-type"].startswith("text/javascript")
    assert "sendBeacon" in response.text


def test_snippet_leaves_cookie_alone(client: TestClient) -> None:
    assert "document.cookie" not in client.get("/mapper.js").text


def test_healthz_answers_ok(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_ready(client: TestClient) -> None:
    response = client.get("/readyz")

    assert (response.status_code, response.json()) == (200, {"status": "ready"})


def test_readyz_old_schema_not_ready(
    client: TestClient, database_url: str, engine: Engine
) -> None:
    command.downgrade(make_alembic_config(database_url), "0001")

    response = client.get("/readyz")

    assert response.status_code == 503
    assert "mapper db upgrade" in response.json()["reason"]


def test_readyz_unreachable_database(settings: Settings) -> None:
    unreachable = make_engine("postgresql://u:planted-password@127.0.0.1:9/none")
    app = create_app(settings, engine=unreachable, deliver=False)

    with TestClient(app) as client:
        response = client.get("/readyz")

    assert response.status_code == 503
    assert "planted-password" not in response.text


def test_metrics_prometheus_text(client: TestClient, fake_ac: FakeAC) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
    client.get("/go", params={"h": HASH, "to": "https://shop.example/"})
    client.post("/track", content=b'{"event": "viewed_pricing"}', headers=BEACON)
    client.post("/track", content=b'{"event": "viewed_pricing"}', headers=BEACON)

    response = client.get("/metrics")

    assert response.headers["content-type"].startswith("text/plain; version=")
    assert "mapper_events_accepted_total 2.0" in response.text
    assert 'mapper_outbox_events{status="pending"} 2.0' in response.text
    assert 'mapper_outbox_events{status="dead"} 0.0' in response.text
    for planted in (EMAIL, HASH, "viewed_pricing", fake_ac.event_key):
        assert planted not in response.text


def test_metrics_repeat_not_accepted(client: TestClient) -> None:
    body = b'{"event": "once", "id": "client-1"}'
    client.post("/track", content=body, headers=BEACON)
    client.post("/track", content=body, headers=BEACON)

    assert "mapper_events_accepted_total 1.0" in client.get("/metrics").text


def test_metrics_without_database(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = make_engine("sqlite:////nonexistent/dir/mapper.db")
    app = create_app(settings, engine=unreachable, deliver=False)

    with TestClient(app) as client:
        response = client.get("/metrics")

    assert response.status_code == 200
    assert "mapper_events_accepted_total 0.0" in response.text
    assert "mapper_outbox_events" not in response.text
    assert "could not be counted" in caplog.text


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
