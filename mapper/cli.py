"""The `mapper` command: run the service and manage its database.

Settings come from the environment and `.env` only; no option takes a
secret, so none ends up in shell history or a process list.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import Any

import click
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from mapper.app import create_app
from mapper.db import check_schema, make_engine, make_sessionmaker, upgrade
from mapper.delivery import run_alone
from mapper.errors import MapperError, SettingsError
from mapper.models import DeadReason, EventStatus
from mapper.outbox import count_events, list_events, replay_dead
from mapper.settings import load_settings

logger = logging.getLogger(__name__)

SERVE_SETTINGS = """
Reads MAPPER_DATABASE_URL, MAPPER_SECRET_KEYS (required), MAPPER_WEBHOOK_SECRET,
MAPPER_AC_API_URL, MAPPER_AC_API_KEY, MAPPER_AC_ACTID, MAPPER_AC_EVENT_KEY,
MAPPER_AC_TRACK_URL, MAPPER_ALLOWED_HOSTS, MAPPER_ALLOWED_ORIGINS,
MAPPER_COOKIE_SECURE and the other MAPPER_ settings listed in the README,
from the environment or a .env file in the working folder.
"""

WORKER_SETTINGS = """
Reads MAPPER_DATABASE_URL, MAPPER_AC_ACTID and MAPPER_AC_EVENT_KEY (both
required), MAPPER_AC_TRACK_URL, MAPPER_AC_RATE_LIMIT and the MAPPER_DELIVERY_
settings listed in the README, from the environment or a .env file.
"""

DATABASE_ONLY = "Reads MAPPER_DATABASE_URL (default: sqlite:///mapper.db)."
LIST_COLUMNS = ("id", "status", "event", "attempts", "received", "reason", "AC said")

# At INFO httpx logs every request URL, and hash lookups carry the API key
# in theirs.
QUIET_LOGGERS = {"httpx": logging.WARNING, "httpcore": logging.WARNING}
# Alembic describes its connection at INFO each time the schema is checked,
# which /readyz does on every probe; `mapper db upgrade` turns it back on.
MIGRATION_LOGGER = "alembic.runtime.migration"
# Allocations between collections of the youngest objects (Python's
# default is 700).
GC_THRESHOLD = 50_000
# How `mapper serve` runs uvicorn; the benchmarks' bare server runs the same.
# The access log would write query strings and webhook paths, which carry AC
# hashes and the webhook secret.
SERVER_OPTIONS: dict[str, Any] = {
    "access_log": False,
    "log_config": None,
    "proxy_headers": False,
}


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
    )
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger(MIGRATION_LOGGER).setLevel(logging.WARNING)


def settle_garbage_collector() -> None:
    """Spare long-running processes the collector's pauses.

    The modules, the app and SQLAlchemy's tables, made at startup, live as
    long as the process: frozen, they are no longer walked by every full
    collection, which otherwise held requests up for tens of milliseconds.
    Requests make many short-lived objects, so collections also start less
    often; the benchmarks measure both.
    """
    # Garbage from startup is collected first, or it would be kept for good.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


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
@click.option(
    "--no-delivery",
    is_flag=True,
    help="Leave delivery to `mapper worker` processes.",
)
def serve(host: str | None, port: int | None, no_delivery: bool) -> None:
    """Run the HTTP service with its event delivery loop.

    Refuses to start while the database schema is not current.
    """
    with report_errors():
        settings = load_settings()
        engine = make_engine(settings.database_url)
        check_schema(engine)
        app = create_app(settings, engine=engine, deliver=not no_delivery)

    logger.info("mapper is starting.")
    settle_garbage_collector()
    uvicorn.run(
        app, host=host or settings.host, port=port or settings.port, **SERVER_OPTIONS
    )


@main.group()
def db() -> None:
    """Manage mapper's database schema."""


@db.command("upgrade", epilog=DATABASE_ONLY)
def upgrade_schema() -> None:
    """Apply all pending migrations to the database."""
    logging.getLogger(MIGRATION_LOGGER).setLevel(logging.INFO)
    with report_errors():
        upgrade(load_settings().database_url)
    logger.info("The database schema is current.")


@main.command(epilog=WORKER_SETTINGS)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve this worker's /metrics on this port of MAPPER_HOST.",
)
def worker(metrics_port: int | None) -> None:
    """Run the event delivery loop alone, without the HTTP service.

    Any number may run beside `mapper serve` on one database. SIGTERM or
    Ctrl-C stops it once the sends in flight have been stored.
    """
    with report_errors():
        settings = load_settings()
        missing = settings.missing_delivery_settings
        if missing:
            raise SettingsError(
                f"mapper worker delivers events to AC; set {' and '.join(missing)}."
            )
        engine = make_engine(settings.database_url)
        check_schema(engine)

    logger.info("mapper worker is starting.")
    settle_garbage_collector()
    with report_errors():
        asyncio.run(run_alone(settings, engine, metrics_port=metrics_port))


@main.group(invoke_without_command=True, epilog=DATABASE_ONLY)
@click.pass_context
def events(context: click.Context) -> None:
    """Count the outbox's events by status, dead ones by reason."""
    if context.invoked_subcommand is not None:
        return
    counts = count_events(_sessions())
    for status, count in counts.by_status.items():
        click.echo(f"{status:<12}{count:>10}")
    for reason, count in sorted(counts.dead_by_reason.items()):
        click.echo(f"  {reason:<10}{count:>10}")


@events.command("list", epilog=DATABASE_ONLY)
@click.option(
    "--status",
    type=click.Choice([status.value for status in EventStatus]),
    default=EventStatus.DEAD.value,
    show_default=True,
    help="Which events to list.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=50,
    show_default=True,
    help="List at most this many, oldest first.",
)
def list_command(status: str, limit: int) -> None:
    """List events, without emails or data, with AC's last answer."""
    lines = list_events(_sessions(), status=EventStatus(status), limit=limit)
    if not lines:
        click.echo(f"No {status} events.")
        return

    click.echo("\t".join(LIST_COLUMNS))
    for line in lines:
        received = line.received_at.isoformat(timespec="seconds")
        reason = line.dead_reason or "-"
        click.echo(
            f"{line.id}\t{line.status}\t{line.name}\t{line.attempts}"
            f"\t{received}\t{reason}\t{line.last_error or ''}"
        )


@events.command("replay", epilog=DATABASE_ONLY)
@click.option("--all", "replay_all", is_flag=True, help="Every dead event.")
@click.option(
    "--reason",
    type=click.Choice([reason.value for reason in DeadReason]),
    help="Dead events with this reason.",
)
@click.option(
    "--id", "ids", type=click.IntRange(1), multiple=True, help="This event; repeatable."
)
def replay(replay_all: bool, reason: str | None, ids: tuple[int, ...]) -> None:
    """Queue dead events for delivery again.

    Each gets its full number of tries again. A replayed event goes after
    the later events of its visitor that were delivered meanwhile.
    """
    chosen = [replay_all, reason is not None, bool(ids)]
    if sum(chosen) != 1:
        raise click.UsageError("Give exactly one of --all, --reason or --id.")

    queued = replay_dead(_sessions(), reason=reason, ids=ids)
    click.echo(f"Queued {_events(queued, 'dead')} for delivery again.")
    others = len(set(ids)) - queued
    if ids and others:
        one = others == 1
        click.echo(
            f"{others} of the ids given {'is' if one else 'are'} not of a dead "
            f"event, and {'it was' if one else 'they were'} left as "
            f"{'it was' if one else 'they were'}."
        )


def _events(count: int, kind: str) -> str:
    return f"{count} {kind} event{'' if count == 1 else 's'}"


def _sessions() -> sessionmaker[Session]:
    with report_errors():
        settings = load_settings()
        engine = make_engine(settings.database_url)
        check_schema(engine)
    return make_sessionmaker(engine)
