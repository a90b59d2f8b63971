"""What delivery costs AC and how fast it drains: AC calls per event beside
a lookup per event, and a backlog drained by one `mapper worker`.

Counts are taken at the fake AC; times by this process's monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import func, select

from benchmarks.report import Size, Table
from benchmarks.stores import BACKENDS, scratch
from mapper.db import make_engine, make_sessionmaker
from mapper.models import Event, EventStatus
from tests.fake_ac import FakeAC
from tests.helpers import ac_env, add_visitors_with_events, wait_until
from tests.service import MapperProcess

EVENTS_PER_VISITOR = 20
CONCURRENCY = 50
BATCH = 500


def delivered(url: str) -> Callable[[], int]:
    """A counter of delivered events in the database at `url`."""
    engine = make_engine(url)
    query = select(func.count()).where(Event.status == EventStatus.DELIVERED)

    def count() -> int:
        with engine.connect() as connection:
            return connection.scalar(query) or 0

    return count


def ac_calls(size: Size) -> Table:
    """AC calls for `size.events` events from identified visitors: mapper
    against resolving each event's hash with AC first."""
    per_visitor = size.events // size.visitors
    with FakeAC() as fake, scratch() as store:
        folder, url = store.folder, store.url
        hashes = [f"{n:032x}" for n in range(size.visitors)]
        for n, ac_hash in enumerate(hashes):
            fake.add_contact(
                contact_id=str(n + 1), email=f"bench{n}@example.com", hash=ac_hash
            )
        env = ac_env(fake) | {
            "MAPPER_DATABASE_URL": url,
            "MAPPER_AC_RATE_LIMIT": "10000",
            "MAPPER_DELIVERY_CONCURRENCY": str(CONCURRENCY),
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

    return Table(
        "AC calls per event",
        f"{size.events:,} events from {size.visitors} visitors, each identified "
        "once through an email link, counted at the fake AC; beside the same "
        "events sent the way mapper replaces, a hash lookup before each post.",
        ("Approach", "Contact lookups", "Event posts", "Lookups per event"),
        [
            (
                f"mapper (+{identifying_lookups} lookups to identify the visitors)",
                f"{mapper_lookups:,}",
                f"{mapper_posts:,}",
                f"{mapper_lookups / size.events:g}",
            ),
            (
                "a lookup per event",
                f"{naive_lookups:,}",
                f"{naive_posts:,}",
                f"{naive_lookups / size.events:g}",
            ),
        ],
    )


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


def drain(size: Size) -> Table:
    """Events per second one `mapper worker` delivers from a backlog, against
    an AC answering in 50 ms, without and with the default rate cap."""
    table = Table(
        "Delivery drain",
        f"A backlog of {size.drain_events:,} pending events, "
        f"{EVENTS_PER_VISITOR} per identified visitor, delivered by one "
        f"`mapper worker` with MAPPER_DELIVERY_CONCURRENCY={CONCURRENCY} and "
        f"MAPPER_DELIVERY_BATCH_SIZE={BATCH}, against a fake AC that answers "
        "each post after 50 ms. Capped, the backlog would take hours, so "
        f"{size.capped_seconds:g} seconds of it are measured.",
        ("Database", "AC rate cap", "Delivered", "Events/s"),
    )
    for backend in BACKENDS:
        table.rows.append(drain_once(size, backend=backend, cap=None))
    table.rows.append(drain_once(size, backend="sqlite", cap=5.0))
    return table


def drain_once(size: Size, *, backend: str, cap: float | None) -> tuple[str, ...]:
    # A visitor's events leave one at a time, so each has a few.
    visitors = max(size.drain_events // EVENTS_PER_VISITOR, 1)
    queued = visitors * EVENTS_PER_VISITOR
    with FakeAC() as fake, scratch(backend) as store:
        folder, url = store.folder, store.url
        add_visitors_with_events(
            make_sessionmaker(make_engine(url)), visitors=visitors, each=20
        )
        fake.set_mode("slow", delay=0.05)
        env = ac_env(fake) | {
            "MAPPER_DATABASE_URL": url,
            "MAPPER_AC_RATE_LIMIT": "10000" if cap is None else f"{cap:g}",
            "MAPPER_DELIVERY_CONCURRENCY": str(CONCURRENCY),
            "MAPPER_DELIVERY_BATCH_SIZE": str(BATCH),
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

    label = "none" if cap is None else f"{cap:g}/s (the default)"
    return (backend, label, f"{sent:,} in {elapsed:.1f} s", f"{sent / elapsed:,.0f}")
