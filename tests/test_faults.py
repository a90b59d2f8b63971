"""Delivery under faults, with real processes on loopback: `mapper serve`
and `mapper worker` against the fake AC, on SQLite and PostgreSQL.

Each test injects one fault (AC down, limiting or refusing; a process
killed or stopped; several processes on one database) and then counts at
the fake AC: events sent, events sent twice, events missing.
"""

from __future__ import annotations

import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from mapper.db import make_engine, make_sessionmaker, upgrade
from mapper.models import Event, EventStatus, utcnow
from tests.conftest import postgres_url, reset_postgres
from tests.fake_ac import FakeAC
from tests.helpers import ac_env as fake_ac_env
from tests.helpers import add_visitors_with_events, events, wait_until
from tests.service import MapperProcess, free_port

EMAIL = "planted.faults@example.com"
HASH = "0cc175b9c0f1b6a831c399e269772661"


@pytest.fixture
def fake_ac() -> Iterator[FakeAC]:
    with FakeAC() as fake:
        fake.add_contact(contact_id="42", email=EMAIL, hash=HASH)
        yield fake


def _env(fake: FakeAC, database_url: str, **changes: str) -> dict[str, str]:
    """Settings for fast fault tests: short pauses, no rate cap unless set."""
    return {
        **fake_ac_env(fake),
        "MAPPER_DATABASE_URL": database_url,
        "MAPPER_ALLOWED_HOSTS": "shop.example",
        "MAPPER_DELIVERY_BACKOFF_MAX": "2",
        "MAPPER_AC_RATE_LIMIT": "10000",
        **changes,
    }


def _count(engine: Engine, status: EventStatus) -> int:
    with Session(engine) as session:
        query = select(func.count()).where(Event.status == status)
        return session.scalar(query) or 0


def _sent(fake: FakeAC) -> Counter[str]:
    """How often the fake AC took each event, by its unique name or data."""
    return Counter(event.get("eventdata") or event["event"] for event in fake.events())


def _click_email_link(browser: httpx.Client) -> None:
    """Land from an email link, so that the browser's visitor is known."""
    browser.get("/go", params={"h": HASH, "to": "https://shop.example/"})


def _track(browser: httpx.Client, name: str, data: str, client_id: str) -> int:
    body = {"event": name, "data": data, "id": client_id}
    return browser.post("/track", json=body).status_code


def test_outage_then_everything_once(
    tmp_path: Path, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    env = _env(fake_ac, database_url)
    with (
        MapperProcess(tmp_path, env) as mapper,
        httpx.Client(base_url=mapper.url) as browser,
    ):
        _click_email_link(browser)
        fake_ac.set_mode("error")
        fake_ac.reset()
        # Each event is sent twice, as a browser retrying it would.
        answers = [
            _track(browser, "outage", f"n={n}", f"c{n}")
            for n in range(60)
            for _ in "ab"
        ]
        time.sleep(3)
        tries_during_outage = len(fake_ac.requests)
        fake_ac.set_mode("up")
        wait_until(lambda: len(fake_ac.events()) >= 60)
        time.sleep(0.5)

    assert set(answers) == {202}
    # Backoff, not a hot loop: 3 s of a failing AC see a few tries.
    assert 1 <= tries_during_outage <= 5
    sent = _sent(fake_ac)
    assert sent == Counter({f"n={n}": 1 for n in range(60)})
    in_order = [event["eventdata"] for event in fake_ac.events()]
    assert in_order == [f"n={n}" for n in range(60)]


@pytest.mark.parametrize(
    ("mode", "least_pause"),
    [
        pytest.param("rate_limit", 1.9, id="429-retry-after"),
        # No header: the first backoff step, 2 s less its 20 % jitter.
        pytest.param("unavailable", 1.55, id="503"),
    ],
)
def test_rate_limit_pauses_sends(
    tmp_path: Path,
    database_url: str,
    engine: Engine,
    fake_ac: FakeAC,
    mode: str,
    least_pause: float,
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=20, each=1)
    fake_ac.set_mode(mode, retry_after=2)
    env = _env(fake_ac, database_url, MAPPER_AC_RATE_LIMIT="5")

    with MapperProcess(tmp_path, env):
        wait_until(lambda: any(r.status in {429, 503} for r in fake_ac.requests))
        fake_ac.set_mode("up")
        wait_until(lambda: _count(engine, EventStatus.DELIVERED) == 20)

    track = [r for r in fake_ac.requests if r.path == "/event"]
    limited = next(r for r in track if r.status in {429, 503})
    after = [r.arrived for r in track if r.arrived > limited.arrived]
    assert min(after) - limited.arrived >= least_pause
    assert _sent(fake_ac) == Counter({f"v{n}_0": 1 for n in range(20)})


def test_rate_cap_shared_by_lookups_and_sends(
    tmp_path: Path, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=20, each=1)
    env = _env(fake_ac, database_url, MAPPER_AC_RATE_LIMIT="5")

    with MapperProcess(tmp_path, env) as mapper:
        for n in range(10):
            unknown = f"{n:032x}"
            httpx.get(f"{mapper.url}/go", params={"h": unknown, "to": "/"})
        wait_until(lambda: _count(engine, EventStatus.DELIVERED) == 20)

    arrivals = sorted(request.arrived for request in fake_ac.requests)
    assert len(arrivals) == 30
    assert fake_ac.lookups() == 10
    # At 5 a second, calls are 0.2 s apart: seven calls span at least 1.2 s.
    # A span under 1 s would mean six or more calls within a second.
    spans = [b - a for a, b in zip(arrivals, arrivals[6:], strict=False)]
    assert min(spans) >= 1.0


def test_wrong_key_stops_delivery_with_one_line(
    tmp_path: Path, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=20, each=1)
    env = _env(
        fake_ac,
        database_url,
        MAPPER_AC_EVENT_KEY="not-the-event-key",
        MAPPER_DELIVERY_CONCURRENCY="1",
    )

    with MapperProcess(tmp_path, env) as mapper:
        wait_until(lambda: "refused the event tracking settings" in mapper.log())
        time.sleep(2)
        log = mapper.log()

    stored = events(engine)
    assert log.count("refused the event tracking settings") == 1
    assert "not-the-event-key" not in log
    # One refusal, then a probe every 2 s (MAPPER_DELIVERY_BACKOFF_MAX),
    # rather than a try of each of the 20 events.
    assert len(fake_ac.requests) <= 3
    assert all(e.status == "pending" and e.refusals == 0 for e in stored)


def test_refused_event_dead_then_replayed(
    tmp_path: Path, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=3, each=2)
    fake_ac.refuse_event("v1_0", "This event is not wanted.")
    env = _env(fake_ac, database_url, MAPPER_DELIVERY_MAX_REFUSALS="2")

    with MapperProcess(tmp_path, env) as mapper:
        wait_until(lambda: _count(engine, EventStatus.DELIVERED) == 5)
        [dead] = [event for event in events(engine) if event.status == "dead"]
        counted = mapper.run_cli("events").stdout
        fake_ac.refuse_event("v1_0", None)
        replayed = mapper.run_cli("events", "replay", "--id", str(dead.id))
        wait_until(lambda: _count(engine, EventStatus.DELIVERED) == 6)

    assert (dead.name, dead.dead_reason, dead.refusals) == ("v1_0", "refused", 2)
    assert dead.last_error == "This event is not wanted."
    assert "refused" in counted and "Queued 1 dead event for" in replayed.stdout
    assert _sent(fake_ac) == Counter({f"v{v}_{n}": 1 for v in range(3) for n in (0, 1)})
    # The visitor's second event waited until its first was dead.
    sends = [r.form["event"] for r in fake_ac.requests if r.path == "/event"]
    refusals_of_first = [n for n, name in enumerate(sends) if name == "v1_0"][:2]
    assert sends.index("v1_1") > refusals_of_first[-1]


def test_sigkill_resends_only_in_flight(
    tmp_path: Path, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=30, each=10)
    fake_ac.set_mode("slow", delay=0.3)
    env = _env(
        fake_ac,
        database_url,
        MAPPER_AC_TIMEOUT="2",
        MAPPER_DELIVERY_LEASE="8",
        MAPPER_DELIVERY_CONCURRENCY="10",
    )

    mapper = MapperProcess(tmp_path, env)
    mapper.start()
    wait_until(lambda: len(fake_ac.events()) >= 50 and fake_ac.in_flight > 0)
    mapper.kill()
    # Sends in flight reach the fake AC after the kill; wait for them.
    wait_until(lambda: fake_ac.in_flight == 0)
    delivered_at_kill = {e.name for e in events(engine) if e.status == "delivered"}
    sent_at_kill = set(_sent(fake_ac))
    fake_ac.set_mode("up")

    with MapperProcess(tmp_path, env, name="restarted"):
        wait_until(lambda: _count(engine, EventStatus.DELIVERED) == 300, seconds=60)

    sent = _sent(fake_ac)
    twice = {name for name, times in sent.items() if times > 1}
    in_flight_at_kill = sent_at_kill - delivered_at_kill
    assert len(sent) == 300
    assert max(sent.values()) <= 2
    assert twice <= in_flight_at_kill
    assert len(in_flight_at_kill) <= 10


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_sigterm_drains_in_flight(
    tmp_path: Path, database_url: str, engine: Engine, fake_ac: FakeAC, command: str
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=10, each=5)
    fake_ac.set_mode("slow", delay=1.0)
    env = _env(fake_ac, database_url, MAPPER_DELIVERY_CONCURRENCY="5")

    mapper = MapperProcess(tmp_path, env, command=(command,))
    mapper.start()
    wait_until(lambda: fake_ac.in_flight > 0)
    status = mapper.stop()
    sent_before_stop = set(_sent(fake_ac))
    stored = events(engine)
    fake_ac.set_mode("up")

    with MapperProcess(tmp_path, env, name="restarted"):
        wait_until(lambda: _count(engine, EventStatus.DELIVERED) == 50)

    # uvicorn ends on the signal it caught, once its shutdown is done.
    assert status in {0, -signal.SIGTERM}
    assert sent_before_stop
    assert sent_before_stop == {e.name for e in stored if e.status == "delivered"}
    assert all(event.lease_token is None for event in stored)
    assert max(_sent(fake_ac).values()) == 1
    assert len(_sent(fake_ac)) == 50


def _workers(
    stack: ExitStack, folder: Path, env: dict[str, str], *, workers: int, serves: int
) -> None:
    for number in range(workers):
        process = MapperProcess(folder, env, command=("worker",), name=f"w{number}")
        stack.enter_context(process)
    for number in range(serves):
        stack.enter_context(MapperProcess(folder, env, name=f"s{number}"))


def _deliver_backlog(
    folder: Path, url: str, fake: FakeAC, *, workers: int, serves: int, visitors: int
) -> None:
    """Queue 100 events for each of `visitors`, run the processes until all
    are delivered, and check the fake AC took each once, in order."""
    engine = make_engine(url)
    add_visitors_with_events(make_sessionmaker(engine), visitors=visitors, each=100)
    total = visitors * 100
    env = _env(fake, url, MAPPER_DELIVERY_BATCH_SIZE="100")

    with ExitStack() as stack:
        _workers(stack, folder, env, workers=workers, serves=serves)
        wait_until(lambda: _count(engine, EventStatus.DELIVERED) == total, seconds=240)
    engine.dispose()

    sent = _sent(fake)
    assert len(sent) == total
    assert max(sent.values()) == 1
    names = [event["event"] for event in fake.events()]
    for visitor in range(visitors):
        mine = [name for name in names if name.startswith(f"v{visitor}_")]
        assert mine == [f"v{visitor}_{n}" for n in range(100)]


def test_three_workers_two_serves_on_postgresql(
    tmp_path: Path, fake_ac: FakeAC
) -> None:
    url = postgres_url()
    reset_postgres(url)
    upgrade(url)

    _deliver_backlog(tmp_path, url, fake_ac, workers=3, serves=2, visitors=100)


def test_second_process_on_sqlite_is_safe(tmp_path: Path, fake_ac: FakeAC) -> None:
    url = f"sqlite:///{tmp_path / 'mapper.db'}"
    upgrade(url)

    _deliver_backlog(tmp_path, url, fake_ac, workers=1, serves=1, visitors=20)


def test_held_events_capped_then_delivered_in_order(
    tmp_path: Path, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    env = _env(fake_ac, database_url, MAPPER_HELD_EVENTS_PER_VISITOR="5")

    with (
        MapperProcess(tmp_path, env) as mapper,
        httpx.Client(base_url=mapper.url) as browser,
    ):
        answers = [_track(browser, "held", f"n={n}", f"h{n}") for n in range(6)]
        held = _count(engine, EventStatus.HELD)
        _click_email_link(browser)
        wait_until(lambda: len(fake_ac.events()) == 5)

    assert answers == [202] * 5 + [429]
    assert held == 5
    assert [e["eventdata"] for e in fake_ac.events()] == [f"n={n}" for n in range(5)]
    assert {e["visit"] for e in fake_ac.events()} == {f'{{"email": "{EMAIL}"}}'}


def test_expired_held_events_dropped(
    tmp_path: Path, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    env = _env(fake_ac, database_url, MAPPER_HELD_EVENT_TTL="3600")
    with (
        MapperProcess(tmp_path, env) as mapper,
        httpx.Client(base_url=mapper.url) as browser,
    ):
        _track(browser, "early", "n=0", "e0")
        _track(browser, "late", "n=1", "e1")

    with Session(engine) as session, session.begin():
        two_hours_ago = utcnow() - timedelta(hours=2)
        session.execute(
            update(Event).where(Event.name == "early").values(received_at=two_hours_ago)
        )

    with MapperProcess(tmp_path, env, name="again") as mapper:
        wait_until(lambda: "Dropped 1 held events" in mapper.log())
        metrics = httpx.get(f"{mapper.url}/metrics").text

    assert [event.name for event in events(engine)] == ["late"]
    assert "mapper_held_events_expired_total 1.0" in metrics


def test_operations_endpoints_and_worker_metrics(
    tmp_path: Path, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=4, each=1)
    port = free_port()
    env = _env(fake_ac, database_url)
    worker = MapperProcess(
        tmp_path, env, command=("worker", "--metrics-port", str(port)), name="w"
    )

    with (
        worker,
        MapperProcess(tmp_path, env, command=("serve", "--no-delivery")) as web,
    ):
        wait_until(lambda: _count(engine, EventStatus.DELIVERED) == 4)
        worker_metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        web_metrics = httpx.get(f"{web.url}/metrics").text
        health = httpx.get(f"{web.url}/healthz").json()
        ready = httpx.get(f"{web.url}/readyz").json()
        stopped = worker.stop()
        log = worker.log()
        web_log = web.log()

    assert "mapper_events_delivered_total 4.0" in worker_metrics
    assert "mapper_events_delivered_total 0.0" in web_metrics
    assert 'mapper_outbox_events{status="delivered"} 4.0' in web_metrics
    assert (health, ready) == ({"status": "ok"}, {"status": "ready"})
    assert stopped == 0 and "mapper worker has stopped." in log
    assert f"Serving /metrics on 127.0.0.1:{port}." in log
    # Readiness probes leave no trace in the log.
    assert "Context impl" not in web_log
    for planted in ("v0@example.com", fake_ac.event_key):
        assert planted not in worker_metrics + web_metrics + log


def test_worker_metrics_port_taken(
    tmp_path: Path, database_url: str, fake_ac: FakeAC
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = _env(fake_ac, database_url)

        result = MapperProcess(tmp_path, env).run_cli("worker", "--metrics-port", port)

    assert result.returncode == 1
    assert f"Cannot serve metrics on MAPPER_HOST, port {port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_needs_event_settings(tmp_path: Path, database_url: str) -> None:
    env = {"MAPPER_DATABASE_URL": database_url}

    result = MapperProcess(tmp_path, env).run_cli("worker")

    assert result.returncode == 1
    assert "set MAPPER_AC_ACTID and MAPPER_AC_EVENT_KEY" in result.stderr
