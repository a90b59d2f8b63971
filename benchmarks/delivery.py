"""What delivery costs AC and how fast it drains: AC calls per event beside
a lookup per event, and a backlog drained by one `mapper worker`.

Counts are taken at the fake AC; times by this process's monotonic clock.
Every email and hash here is made up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from sqlalchemy import Engine, func, select

from benchmarks.report import Size, Table
from benchmarks.stores import BACKENDS, fake_hash, scratch
from mapper.db import make_engine, make_sessionmaker
from mapper.models import Event, EventStatus
from tests.fake_ac import FakeAC
from tests.helpers import ac_env, add_visitors_with_events, wait_until
from tests.service import MapperProcess

EVENTS_PER_VISITOR = 20
CONCURRENCY = 50
BATCH = 500
AC_LATENCY = 0.05
# High enough that the cap never holds a send back.
NO_CAP = "10000"
# MAPPER_AC_RATE_LIMIT's default, AC's documented budget.
CAP = 5.0


@dataclass(frozen=True)
class Calls:
    """What the fake AC was asked, counted."""

    lookups: int
    posts: int


@contextmanager
def delivered_counter(url: str) -> Iterator[DeliveredCounter]:
    """Counts delivered events in the database at `url` while open."""
    engine = make_engine(url)
    try:
        yield DeliveredCounter(engine)
    finally:
        engine.dispose()


class DeliveredCounter:
    """Reads how many events are delivered, each time it is called."""

    QUERY = select(func.count()).where(Event.status == EventStatus.DELIVERED)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __call__(self) -> int:
        with self._engine.connect() as connection:
            return connection.scalar(self.QUERY) or 0


def report_ac_calls(size: Size) -> Table:
    """AC calls for `size.events` events from identified visitors: mapper
    beside resolving each event's hash with AC first."""
    per_visitor = size.events // size.visitors
    hashes = [fake_hash(n) for n in range(size.visitors)]
    with FakeAC() as fake:
        for n, ac_hash in enumerate(hashes):
            fake.add_contact(
                contact_id=str(n + 1), email=f"bench{n}@example.com", hash=ac_hash
            )

        identifying, through_mapper = count_mapper_calls(fake, hashes, per_visitor)
        fake.reset()
        lookup_each_time(fake, hashes=hashes, per_visitor=per_visitor)
        each_time = Calls(fake.lookups(), len(fake.events()))

    table = Table(
        "AC calls per event",
        f"{size.events:,} events from {size.visitors} visitors, each identified "
        "once through an email link, counted at the fake AC; beside the same "
        "events sent the way mapper replaces, a hash lookup before each post.",
        ("Approach", "Lookups for the events", "Event posts", "Lookups per event"),
    )
    approaches = {
        f"mapper, once its {identifying} landings looked the visitors up": (
            through_mapper
        ),
        "a lookup per event": each_time,
    }
    for approach, calls in approaches.items():
        per_event = calls.lookups / size.events
        table.rows.append(
            (approach, f"{calls.lookups:,}", f"{calls.posts:,}", f"{per_event:g}")
        )
    return table


def count_mapper_calls(
    fake: FakeAC, hashes: list[str], per_visitor: int
) -> tuple[int, Calls]:
    """Identify a visitor per hash through `/go`, track `per_visitor`
    events each, and wait for their delivery; return the lookups the
    landings took, and the calls the events took."""
    with scratch() as store, delivered_counter(store.url) as delivered:
        env = ac_env(fake) | {
            "MAPPER_DATABASE_URL": store.url,
            "MAPPER_AC_RATE_LIMIT": NO_CAP,
            "MAPPER_DELIVERY_CONCURRENCY": str(CONCURRENCY),
        }
        with MapperProcess(store.folder, env) as mapper:
            browsers = [httpx.Client(base_url=mapper.url) for _ in hashes]
            for browser, ac_hash in zip(browsers, hashes, strict=True):
                browser.get("/go", params={"h": ac_hash, "to": "/landed"})
            identifying = fake.lookups()
            fake.reset()

            def track(browser: httpx.Client) -> None:
                for n in range(per_visitor):
                    browser.post("/track", json={"event": "bench", "data": str(n)})
                browser.close()

            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(track, browsers))
            total = per_visitor * len(hashes)
            wait_until(lambda: delivered() == total, seconds=600)

    return identifying, Calls(fake.lookups(), len(fake.events()))


def lookup_each_time(fake: FakeAC, *, hashes: list[str], per_visitor: int) -> None:
    """The approach mapper replaces: each event asks AC whose hash it has,
    then posts the event with the email AC answered."""
    with httpx.Client(base_url=fake.url) as client:
        for ac_hash in hashes:
            for n in range(per_visitor):
                lookup = {
                    "api_action": "contact_view_hash",
                    "api_key": fake.api_key,
                    "api_output": "json",
                    "hash": ac_hash,
                }
                answer = client.get("/admin/api.php", params=lookup).json()

                event = {
                    "actid": fake.actid,
                    "key": fake.event_key,
                    "event": "bench",
                    "eventdata": str(n),
                    "visit": f'{{"email": "{answer["email"]}"}}',
                }
                client.post("/event", data=event)


def report_drain(size: Size) -> Table:
    """Events per second one `mapper worker` delivers from a backlog, against
    an AC answering in 50 ms, without and with the default rate cap."""
    table = Table(
        "Delivery drain",
        f"A backlog of {size.drain_events:,} pending events, "
        f"{EVENTS_PER_VISITOR} per identified visitor, delivered by one "
        f"`mapper worker` with MAPPER_DELIVERY_CONCURRENCY={CONCURRENCY} and "
        f"MAPPER_DELIVERY_BATCH_SIZE={BATCH}, against a fake AC that answers "
        f"each post after {AC_LATENCY * 1000:g} ms. Capped at {CAP:g}/s, the "
        f"backlog would take {size.drain_events / CAP / 60:,.0f} minutes, so "
        f"{size.capped_seconds:g} seconds of it are measured.",
        ("Database", "AC rate cap", "Delivered", "Events/s"),
    )
    for backend in BACKENDS:
        table.rows.append(measure_drain(size, backend=backend, cap=None))
    table.rows.append(measure_drain(size, backend="sqlite", cap=CAP))
    return table


def measure_drain(size: Size, *, backend: str, cap: float | None) -> tuple[str, ...]:
    """One drain of a fresh backlog; the row of the drain table."""
    # A visitor's events leave one at a time, so each has a few.
    visitors = max(size.drain_events // EVENTS_PER_VISITOR, 1)
    queued = visitors * EVENTS_PER_VISITOR
    with FakeAC() as fake, scratch(backend) as store:
        engine = make_engine(store.url)
        sessions = make_sessionmaker(engine)
        add_visitors_with_events(sessions, visitors=visitors, each=EVENTS_PER_VISITOR)
        engine.dispose()

        fake.set_mode("slow", delay=AC_LATENCY)
        env = ac_env(fake) | {
            "MAPPER_DATABASE_URL": store.url,
            "MAPPER_AC_RATE_LIMIT": NO_CAP if cap is None else f"{cap:g}",
            "MAPPER_DELIVERY_CONCURRENCY": str(CONCURRENCY),
            "MAPPER_DELIVERY_BATCH_SIZE": str(BATCH),
            "MAPPER_DELIVERY_INTERVAL": "0.05",
        }
        with (
            delivered_counter(store.url) as delivered,
            MapperProcess(store.folder, env, command=("worker",)),
        ):
            started = time.monotonic()
            if cap is None:
                wait_until(lambda: delivered() == queued, seconds=900)
            else:
                time.sleep(size.capped_seconds)
            elapsed = time.monotonic() - started
            sent = delivered()

    label = "none" if cap is None else f"{cap:g}/s (the default)"
    return (backend, label, f"{sent:,} in {elapsed:.1f} s", f"{sent / elapsed:,.0f}")
