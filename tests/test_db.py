"""The schema and its guarantees, checked on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from mapper.db import (
    check_schema,
    make_alembic_config,
    make_engine,
    pick_driver,
    upgrade,
)
from mapper.errors import SchemaError
from mapper.models import Base, Contact, Visitor
from tests.helpers import contacts


def _contact(email: str, ac_id: str) -> Contact:
    return Contact(ac_contact_id=ac_id, email=email, source="test")


def test_email_unique_in_database(engine: Engine) -> None:
    with Session(engine) as session:
        session.add_all(
            [_contact("a@example.com", "1"), _contact("a@example.com", "2")]
        )

        with pytest.raises(IntegrityError):
            session.commit()


def test_ac_hash_unique_in_database(engine: Engine) -> None:
    with Session(engine) as session:
        for ac_id in ("1", "2"):
            row = _contact(f"{ac_id}@example.com", ac_id)
            row.ac_hash = "a" * 32
            session.add(row)

        with pytest.raises(IntegrityError):
            session.commit()


def test_times_read_back_utc(engine: Engine) -> None:
    moment = datetime(2024, 5, 2, 8, 30, tzinfo=timezone(timedelta(hours=-5)))
    with Session(engine) as session, session.begin():
        row = _contact("a@example.com", "1")
        row.ac_updated_at = moment
        session.add(row)

    [stored] = contacts(engine)

    assert stored.ac_updated_at == moment
    assert stored.ac_updated_at.tzinfo == UTC


def test_naive_time_refused(engine: Engine) -> None:
    with Session(engine) as session:
        session.add(Visitor(public_id="v", last_seen_at=datetime(2024, 1, 1)))

        with pytest.raises(StatementError):
            session.commit()


def test_check_schema_current_passes(engine: Engine) -> None:
    check_schema(engine)


def test_check_schema_empty_database(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()

    with pytest.raises(SchemaError, match="mapper db upgrade"):
        check_schema(make_engine(f"sqlite:///{path}"))


def test_check_schema_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "never-made.db"

    with pytest.raises(SchemaError, match="does not exist"):
        check_schema(make_engine(f"sqlite:///{path}"))
    assert not path.exists()


def test_unreachable_database_named(tmp_path: Path) -> None:
    url = "postgresql://someone:planted-password@127.0.0.1:9/nothing"

    with pytest.raises(SchemaError, match="MAPPER_DATABASE_URL") as caught:
        upgrade(url)

    assert "planted-password" not in str(caught.value)
    assert caught.value.__cause__ is None


def test_models_match_migrations(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)

    assert differences == []


def test_upgrade_is_repeatable(database_url: str, engine: Engine) -> None:
    upgrade(database_url)

    check_schema(engine)


def test_downgrade_then_upgrade(database_url: str, engine: Engine) -> None:
    command.downgrade(make_alembic_config(database_url), "base")
    upgrade(database_url)

    check_schema(engine)


def test_sqlite_pragmas_applied(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/p.db")

    with engine.connect() as connection:
        mode = connection.execute(text("PRAGMA journal_mode")).scalar()
        keys = connection.execute(text("PRAGMA foreign_keys")).scalar()

    assert (mode, keys) == ("wal", 1)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("postgresql://u:p@h/db", "postgresql+psycopg://u:p@h/db", id="pg"),
        pytest.param(
            "postgres://u:p@h/db", "postgresql+psycopg://u:p@h/db", id="short"
        ),
        pytest.param("sqlite:///x.db", "sqlite:///x.db", id="sqlite"),
    ],
)
def test_pick_driver_for_url(url: str, expected: str) -> None:
    assert pick_driver(url) == expected


def test_engine_hides_parameters(engine: Engine) -> None:
    assert engine.hide_parameters


def test_check_schema_unreachable_server() -> None:
    engine = make_engine("postgresql://someone:planted-password@127.0.0.1:9/x")

    with pytest.raises(SchemaError, match="Could not open") as caught:
        check_schema(engine)

    assert "planted-password" not in str(caught.value)
