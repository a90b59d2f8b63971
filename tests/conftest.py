"""Fixtures: a fresh database per test on SQLite and on PostgreSQL, built by
the migrations; the fake AC on loopback; and in-process clients."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from mapper.app import create_app
from mapper.db import make_engine, upgrade
from mapper.settings import Settings
from tests.fake_ac import FakeAC
from tests.helpers import make_settings

DEFAULT_TEST_PG = "postgresql://postgres:postgres@127.0.0.1:5432/test"
BASE_URL = "https://mapper.shop.example"

ClientFactory = Callable[..., TestClient]


def postgres_url() -> str:
    return os.environ.get("MAPPER_TEST_DATABASE_URL", DEFAULT_TEST_PG)


def reset_postgres(url: str) -> None:
    """Empty the test database, or skip (fail under CI) if it is not there."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
            conn.execute("CREATE SCHEMA public")
    except psycopg.OperationalError as exc:
        skip_without_postgres(exc)


def require_postgres() -> None:
    """Skip (fail under CI) unless the test server answers."""
    try:
        with psycopg.connect(postgres_url(), connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        skip_without_postgres(exc)


def skip_without_postgres(exc: psycopg.OperationalError) -> None:
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


@pytest.fixture
def settings(database_url: str, fake_ac: FakeAC) -> Settings:
    return make_settings(database_url, fake_ac)


@pytest.fixture
def client_with(
    database_url: str, engine: Engine, fake_ac: FakeAC
) -> Iterator[ClientFactory]:
    """Make in-process clients of apps with settings changed by `env`."""
    clients: list[TestClient] = []

    def make(*, with_ac: bool = True, **env: str) -> TestClient:
        settings = make_settings(database_url, fake_ac if with_ac else None, **env)
        app = create_app(settings, engine=engine, deliver=False)
        client = TestClient(app, base_url=BASE_URL, follow_redirects=False)
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(client_with: ClientFactory) -> TestClient:
    return client_with()
