"""Alembic's entry point: runs migrations against mapper's database.

The URL comes from the caller (`mapper db upgrade`) or from mapper's
settings, never from alembic.ini; it may hold the database password, so
it is never printed.
"""

from __future__ import annotations

from alembic import context

from mapper.db import make_engine
from mapper.models import Base
from mapper.settings import load_settings


def database_url() -> str:
    """The URL `mapper db upgrade` passed, else the configured one."""
    url = context.config.attributes.get("database_url")
    return str(url) if url else load_settings().database_url


def run_migrations() -> None:
    engine = make_engine(database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # SQLite cannot alter most columns in place; batch mode rebuilds
            # the table instead.
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
