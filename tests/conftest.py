"""Fixtures: a fresh database per test on SQLite and on PostgreSQL, built by
the migrations, the fake AC on loopback, and an in-process client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.testclient import TestClient

from mapper.app import create_app
from mapper.db import make_engine, upgrade
from mapper.settings import Settings, load_settings
from tests.fake_ac import FakeAC

DEFAULT_TEST_PG = "postgresql://postgres:postgres@127.0.0.1:5432/test"
SECRET_KEY = "test-signing-key-0123456789abcdef"
WEBHOOK_SECRET = "test-webhook-secret-0123456789"
SITE = "shop.example"
BASE_URL = "https://mapper.shop.example"


def postgres_url() -> str:
    return os.environ.get("MAPPER_TEST_DATABASE_URL", DEFAULT_TEST_PG)


def reset_postgres(url: str) -> None:
    """Empty the test database, or skip (fail under CI) if it is not there."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
            conn.execute("CREATE SCHEMA public")
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required under CI and is unreachable: {exc}")
        pytest.skip("PostgreSQL is not reachable; set MAPPER_TEST_DATABASE_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'mapper.db'}"
    else:
        url = postgres_url()
        reset_postgres(url)
    upgrade(url)
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def fake_ac() -> Iterator[FakeAC]:
    with FakeAC() as ac:
        yield ac


def make_settings(database_url: str, fake_ac: FakeAC | None, **env: str) -> Settings:
    """Settings as an operator would give them, pointed at the fake AC."""
    environ = {
        "MAPPER_DATABASE_URL": database_url,
        "MAPPER_SECRET_KEYS": SECRET_KEY,
        "MAPPER_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "MAPPER_ALLOWED_HOSTS": SITE,
        "MAPPER_ALLOWED_ORIGINS": f"https://{SITE}",
    }
    if fake_ac is not None:
        environ |= {
            "MAPPER_AC_API_URL": fake_ac.url,
            "MAPPER_AC_API_KEY": fake_ac.api_key,
            "MAPPER_AC_ACTID": fake_ac.actid,
            "MAPPER_AC_EVENT_KEY": fake_ac.event_key,
            "MAPPER_AC_TRACK_URL": fake_ac.track_url,
        }
    return load_settings(environ | env, env_file=None)


@pytest.fixture
def settings(database_url: str, fake_ac: FakeAC) -> Settings:
    return make_settings(database_url, fake_ac)


@pytest.fixture
def app(settings: Settings, engine: Engine) -> Starlette:
    return create_app(settings, engine=engine, deliver=False)


@pytest.fixture
def client(app: Starlette) -> Iterator[TestClient]:
    with TestClient(app, base_url=BASE_URL, follow_redirects=False) as client:
        yield client
