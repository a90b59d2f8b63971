"""The database engine, sessions, and the migration commands.

The engine never logs statement parameters, because they hold emails.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mapper.errors import SchemaError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The driver's own message names the server and the user; these name the
# setting and the likely causes instead.
UNREACHABLE_SERVER = (
    "Could not open or migrate the database at MAPPER_DATABASE_URL. Check the "
    "address, the user and the password, and that the server is up."
)
UNREADABLE_FILE = (
    "Could not open or migrate the SQLite file at MAPPER_DATABASE_URL. Check "
    "that its folder exists and that mapper may write there."
)
MIGRATIONS = PROJECT_ROOT / "migrations"


def pick_driver(url: str) -> str:
    """Pick the psycopg 3 driver for a bare `postgresql://` URL."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def make_engine(url: str) -> Engine:
    """Create the engine, with SQLite set up for several writers."""
    url = pick_driver(url)
    if not url.startswith("sqlite"):
        return create_engine(url, hide_parameters=True, pool_pre_ping=True)

    engine = create_engine(
        url, hide_parameters=True, connect_args={"check_same_thread": False}
    )
    event.listen(engine, "connect", _prepare_sqlite)
    event.listen(engine, "begin", _begin_sqlite)
    return engine


def _prepare_sqlite(dbapi_connection: Any, connection_record: Any) -> None:
    # Let SQLAlchemy, not the driver, open transactions, so that every one
    # can start as BEGIN IMMEDIATE below.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_sqlite(connection: Any) -> None:
    # Taking the write lock up front makes a second writer wait on the busy
    # timeout instead of failing when its read turns into a write.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_alembic_config(url: str | None = None) -> AlembicConfig:
    """An Alembic config for `url`; alembic.ini itself holds no URL."""
    config = AlembicConfig(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the migrations up to `revision`."""
    try:
        command.upgrade(make_alembic_config(url), revision)
    except SQLAlchemyError:
        raise SchemaError(_unreachable(url)) from None


def _unreachable(url: str) -> str:
    return UNREADABLE_FILE if url.startswith("sqlite") else UNREACHABLE_SERVER


@functools.cache
def newest_revision() -> str | None:
    """The head of the migrations shipped with this mapper.

    Read once per process: the files do not change under a running
    process, and /readyz asks on every probe.
    """
    return ScriptDirectory.from_config(make_alembic_config()).get_current_head()


def check_schema(engine: Engine) -> None:
    """Raise `SchemaError` unless the database is at the newest revision.

    A missing SQLite file is reported as such, rather than created empty.
    """
    path = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and path and path != ":memory:":
        if not Path(path).exists():
            raise SchemaError(
                "The SQLite database file does not exist yet. Run "
                "`mapper db upgrade` with the same MAPPER_DATABASE_URL first."
            )

    head = newest_revision()
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError:
        raise SchemaError(_unreachable(str(engine.url))) from None

    if current != head:
        raise SchemaError(
            "The database schema is not current. Run `mapper db upgrade` "
            "with the same MAPPER_DATABASE_URL, then start again."
        )
