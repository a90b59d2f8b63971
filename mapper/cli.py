"""The `mapper` command: run the service and manage its database.

Settings come from the environment and `.env` only; no option takes a
secret, so none ends up in shell history or a process list.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import click
import uvicorn

from mapper.app import create_app
from mapper.db import check_schema, make_engine, upgrade
from mapper.errors import MapperError
from mapper.settings import load_settings

logger = logging.getLogger(__name__)

SERVE_SETTINGS = """
Reads MAPPER_DATABASE_URL, MAPPER_SECRET_KEYS (required), MAPPER_WEBHOOK_SECRET,
MAPPER_AC_API_URL, MAPPER_AC_API_KEY, MAPPER_AC_ACTID, MAPPER_AC_EVENT_KEY,
MAPPER_AC_TRACK_URL, MAPPER_ALLOWED_HOSTS, MAPPER_ALLOWED_ORIGINS,
MAPPER_COOKIE_SECURE and the other MAPPER_ settings listed in the README,
from the environment or a .env file in the working folder.
"""

# At INFO httpx logs every request URL, and hash lookups carry the API key
# in theirs.
QUIET_LOGGERS = {"httpx": logging.WARNING, "httpcore": logging.WARNING}


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
    )
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def report_errors() -> Iterator[None]:
    """Turn mapper's own errors into one clear line and exit status 1."""
    try:
        yield
    except MapperError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """mapper: signed visitor IDs mapped to ActiveCampaign contacts."""
    configure_logging()


@main.command(epilog=SERVE_SETTINGS)
@click.option(
    "--host", help="Interface to listen on; default MAPPER_HOST, else 127.0.0.1."
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port to listen on; default MAPPER_PORT, else 8000.",
)
def serve(host: str | None, port: int | None) -> None:
    """Run the HTTP service with its event delivery loop.

    Refuses to start while the database schema is not current.
    """
    with report_errors():
        settings = load_settings()
        engine = make_engine(settings.database_url)
        check_schema(engine)
        app = create_app(settings, engine=engine)

    logger.info("mapper is starting.")
    uvicorn.run(
        app,
        host=host or settings.host,
        port=port or settings.port,
        # The access log would write query strings and webhook paths, which
        # carry AC hashes and the webhook secret.
        access_log=False,
        log_config=None,
        proxy_headers=False,
    )


@main.group()
def db() -> None:
    """Manage mapper's database schema."""


@db.command(
    "upgrade", epilog="Reads MAPPER_DATABASE_URL (default: sqlite:///mapper.db)."
)
def upgrade_schema() -> None:
    """Apply all pending migrations to the database."""
    with report_errors():
        upgrade(load_settings().database_url)
    logger.info("The database schema is current.")
