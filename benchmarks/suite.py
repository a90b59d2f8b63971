"""The benchmark suite: each measurement runs real processes on loopback.

`mapper serve` and `mapper worker` run as an operator would start them,
against the fake AC from the tests, on a SQLite file in a scratch folder.
Counts are taken at the fake AC; times by this process's monotonic clock.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click
import httpx
from sqlalchemy import func, select

from mapper.db import make_engine, make_sessionmaker, upgrade
from mapper.models import Event, EventStatus
from tests.fake_ac import FakeAC
from tests.helpers import ac_env, add_visitors_with_events, wait_until
from tests.service import MapperProcess

DEFAULT_OUTPUT = Path("docs/benchmarks.md")


@dataclass(frozen=True)
class Size:
    """How big each measurement runs."""

    visitors: int
    events: int
    drain_events: int
    capped_seconds: float


FULL = Size(visitors=100, events=10_000, drain_events=20_000, capped_seconds=10)
SMOKE = Size(visitors=5, events=50, drain_events=200, capped_seconds=2)


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    measurement: str
    setting: str
    result: str


@contextmanager
def scratch() -> Iterator[tuple[Path, str]]:
    """A folder and a migrated SQLite database in it, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="mapper-bench-") as name:
        folder = Path(name)
        url = f"sqlite:///{folder / 'mapper.db'}"
        upgrade(url)
        yield folder, url


def delivered(url: str) -> Callable[[], int]:
    """A counter of delivered events in the database at `url`."""
    engine = make_engine(url)
    query = select(func.count()).where(Event.status == EventStatus.DELIVERED)

    def count() -> int:
        with engine.connect() as connection:
            return connection.scalar(query) or 0

    return count


def ac_calls(size: Size) -> list[Row]:
    """AC calls for `size.events` events from identified visitors: mapper
    against resolving each event's hash with AC first."""
    per_visitor = size.events // size.visitors
    with FakeAC() as fake, scratch() as (folder, url):
        hashes = [f"{n:032x}" for n in range(size.visitors)]
        for n, ac_hash in enumerate(hashes):
            fake.add_contact(
                contact_id=str(n + 1), email=f"bench{n}@example.com", hash=ac_hash
            )
        env = ac_env(fake) | {
            "MAPPER_DATABASE_URL": url,
            "MAPPER_AC_RATE_LIMIT": "10000",
            "MAPPER_DELIVERY_CONCURRENCY": "50",
        }

        with MapperProcess(folder, env) as mapper:
            browsers = [httpx.Client(base_url=mapper.url) for _ in hashes]
            for browser, ac_hash in zip(browsers, hashes, strict=True):
                browser.get("/go", params={"h": ac_hash, "to": "/landed"})
            identifying_lookups = fake.lookups()
            fake.reset()

            def track(browser: httpx.Client) -> None:
                for n in range(per_visitor):
                    browser.post("/track", json={"event": "bench", "data": str(n)})

            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(track, browsers))
            count = delivered(url)
            wait_until(lambda: count() == size.events, seconds=600)
            for browser in browsers:
                browser.close()
        mapper_lookups, mapper_posts = fake.lookups(), len(fake.events())

        fake.reset()
        lookup_each_time(fake, hashes, per_visitor)
        naive_lookups, naive_posts = fake.lookups(), len(fake.events())

    setting = f"{size.events:,} events, {size.visitors} visitors"
    return [
        Row(
            "AC calls, mapper",
            setting,
            f"{mapper_lookups} lookups, {mapper_posts:,} posts "
            f"(+{identifying_lookups} lookups to identify the visitors)",
        ),
        Row(
            "AC calls, a lookup per event",
            setting,
            f"{naive_lookups:,} lookups, {naive_posts:,} posts",
        ),
    ]


def lookup_each_time(fake: FakeAC, hashes: list[str], per_visitor: int) -> None:
    """The approach mapper replaces: each event asks AC whose hash it has,
    then posts the event with the email AC answered."""
    with httpx.Client(base_url=fake.url) as client:
        for ac_hash in hashes:
            for n in range(per_visitor):
                answer = client.get(
                    "/admin/api.php",
                    params={
                        "api_action": "contact_view_hash",
                        "api_key": fake.api_key,
                        "api_output": "json",
                        "hash": ac_hash,
                    },
                ).json()
                client.post(
                    "/event",
                    data={
                        "actid": fake.actid,
                        "key": fake.event_key,
                        "event": "bench",
                        "eventdata": str(n),
                        "visit": f'{{"email": "{answer["email"]}"}}',
                    },
                )


def drain(size: Size, *, concurrency: int) -> list[Row]:
    """Events per second one `mapper worker` delivers from a backlog, against
    an AC answering in 50 ms, without and with the default rate cap."""
    return [
        drain_once(size, concurrency=concurrency, cap=None),
        drain_once(size, concurrency=concurrency, cap=5.0),
    ]


def drain_once(size: Size, *, concurrency: int, cap: float | None) -> Row:
    # 20 events a visitor: a visitor's events leave one at a time.
    visitors = max(size.drain_events // 20, 1)
    queued = visitors * 20
    with FakeAC() as fake, scratch() as (folder, url):
        add_visitors_with_events(
            make_sessionmaker(make_engine(url)), visitors=visitors, each=20
        )
        fake.set_mode("slow", delay=0.05)
        env = ac_env(fake) | {
            "MAPPER_DATABASE_URL": url,
            "MAPPER_AC_RATE_LIMIT": "10000" if cap is None else f"{cap:g}",
            "MAPPER_DELIVERY_CONCURRENCY": str(concurrency),
            "MAPPER_DELIVERY_BATCH_SIZE": "500",
            "MAPPER_DELIVERY_INTERVAL": "0.05",
        }
        count = delivered(url)
        with MapperProcess(folder, env, command=("worker",)):
            started = time.monotonic()
            if cap is None:
                wait_until(lambda: count() == queued, seconds=900)
            else:
                # Capped, the whole backlog would take hours: a window tells.
                time.sleep(size.capped_seconds)
            elapsed = time.monotonic() - started
            sent = count()

    label = "no cap" if cap is None else f"cap {cap:g}/s (the default)"
    setting = (
        f"{queued:,} queued, AC answers in 50 ms, {label}, "
        f"concurrency {concurrency}, batch 500"
    )
    return Row("Delivery drain", setting, f"{sent / elapsed:,.0f} events/s")


def render(rows: list[Row], *, smoke: bool) -> str:
    """The results as a Markdown page."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.python_implementation()} {platform.python_version()}"
    lines = [
        "# Benchmarks",
        "",
        f"Measured {now} with `scripts/bench`{' --smoke' if smoke else ''}, "
        f"{machine}, {os.cpu_count()} CPUs, SQLite.",
        "",
        "| Measurement | Setting | Result |",
        "|---|---|---|",
    ]
    lines += [f"| {row.measurement} | {row.setting} | {row.result} |" for row in rows]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--smoke", is_flag=True, help="Run each measurement small.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_OUTPUT,
    show_default=True,
    help="Where to write the Markdown table.",
)
def main(smoke: bool, output: Path) -> None:
    """Run the benchmarks, print the table and write it to --output."""
    size = SMOKE if smoke else FULL
    rows = ac_calls(size) + drain(size, concurrency=50)
    page = render(rows, smoke=smoke)
    click.echo(page)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, "utf-8")
