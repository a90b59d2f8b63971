"""Scratch databases for the benchmarks, and bulk rows to fill them with.

Each measurement gets a database of its own, migrated by `mapper db
upgrade`'s code and removed afterwards: a SQLite file in a scratch folder,
or a PostgreSQL database made on the server the tests use. Every email and
hash here is made up.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url
from starlette.datastructures import Secret

from mapper.db import make_engine, upgrade
from mapper.models import Contact, ContactStatus, Source, Visitor, utcnow
from mapper.tokens import VisitorId, VisitorSigner
from tests.service import SECRET_KEY

DEFAULT_POSTGRES = "postgresql://postgres:postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgresql")
# Rows per INSERT statement while filling.
FILL_CHUNK = 10_000
SYNC_SEQUENCE = (
    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
    "(SELECT max(id) FROM {table}))"
)


@dataclass(frozen=True)
class Store:
    """A scratch folder for processes' logs, and the database URL to use."""

    backend: str
    folder: Path
    url: str


@contextmanager
def scratch(backend: str = "sqlite") -> Iterator[Store]:
    """A migrated database of `backend`, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="mapper-bench-") as name:
        folder = Path(name)
        if backend == "sqlite":
            url = f"sqlite:///{folder / 'mapper.db'}"
            upgrade(url)
            yield Store(backend, folder, url)
            return

        with postgres_database() as url:
            upgrade(url)
            yield Store(backend, folder, url)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database on the test server, dropped afterwards.

    The server is the one MAPPER_TEST_DATABASE_URL names, as for the tests;
    the database's name is this run's own, so that runs side by side do not
    drop each other's.
    """
    server = make_url(os.environ.get("MAPPER_TEST_DATABASE_URL", DEFAULT_POSTGRES))
    name = f"mapper_bench_{secrets.token_hex(4)}"
    # libpq takes the URL without SQLAlchemy's driver name.
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def fake_hash(number: int) -> str:
    """The made-up AC hash of the contact with `number`."""
    return f"{number:032x}"


def fake_visitor_id(number: int) -> VisitorId:
    """The made-up visitor id of the visitor with `number`."""
    return VisitorId(f"bench-visitor-{number:012d}")


def visitor_cookie(number: int) -> str:
    """The cookie header of visitor `number`, signed as `MapperProcess` signs."""
    signer = VisitorSigner([Secret(SECRET_KEY)], max_age=3600)
    return f"mapper_vid={signer.sign(fake_visitor_id(number))}"


def fill(url: str, *, rows: int) -> None:
    """Store `rows` contacts, each with one visitor identified by its hash.

    Contact n has the email contact<n>@bench.example and `fake_hash(n)`;
    its visitor has `fake_visitor_id(n)`.
    """
    engine = make_engine(url)
    now = utcnow()
    try:
        for start in range(0, rows, FILL_CHUNK):
            numbers = range(start, min(start + FILL_CHUNK, rows))
            with engine.begin() as connection:
                connection.execute(
                    insert(Contact),
                    [_contact_row(n, now) for n in numbers],
                )
                connection.execute(
                    insert(Visitor),
                    [_visitor_row(n, now) for n in numbers],
                )
        if engine.dialect.name == "postgresql":
            # Rows given their ids leave the id sequences behind.
            with engine.begin() as connection:
                for table in ("contacts", "visitors"):
                    connection.execute(text(SYNC_SEQUENCE.format(table=table)))
    finally:
        engine.dispose()


def _contact_row(number: int, now: datetime) -> dict[str, object]:
    return {
        "id": number + 1,
        "ac_contact_id": str(number + 1),
        "email": f"contact{number}@bench.example",
        "ac_hash": fake_hash(number),
        "status": ContactStatus.ACTIVE,
        "source": Source.WEBHOOK,
        "ac_updated_at": now,
        "created_at": now,
        "updated_at": now,
    }


def _visitor_row(number: int, now: datetime) -> dict[str, object]:
    return {
        "id": number + 1,
        "public_id": fake_visitor_id(number),
        "contact_id": number + 1,
        "created_at": now,
        "last_seen_at": now,
        "identified_at": now,
        "identified_by": Source.HASH,
    }
