"""The delivery loop against the fake AC over loopback, on both databases."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import pytest
from sqlalchemy import Engine, text, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from mapper.clients import ACClient, DeliveryResult, Outcome
from mapper.db import make_engine, make_sessionmaker
from mapper.delivery import (
    Attempt,
    DeliveryWorker,
    claim_due,
    compute_backoff,
    expire_held,
    record_result,
)
from mapper.metrics import Metrics
from mapper.models import Event, utcnow
from mapper.settings import Settings
from tests.fake_ac import FakeAC
from tests.helpers import (
    EMAIL,
    FORM,
    HASH,
    JSON_FROM_SITE,
    WEBHOOK_URL,
    add_visitors_with_events,
    contact_webhook,
    events,
    make_settings,
)

T = TypeVar("T")


def _identified_events(client: TestClient, fake_ac: FakeAC, *names: str) -> None:
    fake_ac.add_contact(contact_id="42", email=EMAIL, hash=HASH)
    client.get("/go", params={"h": HASH, "to": "https://shop.example/"})
    for name in names:
        body = json.dumps({"event": name, "data": {"plan": "pro"}})
        client.post("/track", content=body, headers=JSON_FROM_SITE)
    # From here on the fake records only what delivery sends.
    fake_ac.reset()


def _worker(
    settings: Settings, sessions: sessionmaker[Session] | Engine, client: ACClient
) -> DeliveryWorker:
    if isinstance(sessions, Engine):
        sessions = make_sessionmaker(sessions)
    return DeliveryWorker(
        settings, sessions=sessions, client=client, metrics=Metrics(sessions)
    )


def _with_worker(
    settings: Settings, engine: Engine, work: Callable[[DeliveryWorker], Awaitable[T]]
) -> T:
    """Run `work` with a worker on `engine`, closing its AC client after."""

    async def run() -> T:
        client = ACClient(settings)
        try:
            return await work(_worker(settings, engine, client))
        finally:
            await client.aclose()

    return asyncio.run(run())


def _deliver(settings: Settings, engine: Engine) -> int:
    """Run one delivery round; return how many events it attempted."""
    return _with_worker(settings, engine, lambda worker: worker.deliver_round())


def _due_now(engine: Engine) -> None:
    """Let every pending event be tried at once, backoff or not."""
    with Session(engine) as session, session.begin():
        session.execute(update(Event).values(next_attempt_at=utcnow()))


def test_delivery_posts_documented_form(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "viewed_pricing")

    _deliver(settings, engine)

    [request] = fake_ac.requests
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.form == {
        "actid": fake_ac.actid,
        "key": fake_ac.event_key,
        "event": "viewed_pricing",
        "eventdata": '{"plan":"pro"}',
        "visit": '{"email": "alice@example.com"}',
    }
    assert events(engine)[0].status == "delivered"


def test_delivery_uses_current_email(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "viewed_pricing")
    changed = contact_webhook(
        email="alice.new@example.com", date_time=utcnow().isoformat()
    )
    client.post(WEBHOOK_URL, content=changed, headers=FORM)

    _deliver(settings, engine)

    assert fake_ac.events()[0]["visit"] == '{"email": "alice.new@example.com"}'


def test_delivery_without_data_omits_field(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac)
    client.post("/track", content=b'{"event": "bare"}', headers=JSON_FROM_SITE)

    _deliver(settings, engine)

    assert "eventdata" not in fake_ac.events()[0]


def test_delivery_no_lookup_per_event(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, *[f"event_{n}" for n in range(30)])

    while _deliver(settings, engine):
        pass

    assert len(fake_ac.events()) == 30
    assert fake_ac.lookups() == 0


def test_delivery_keeps_held_events(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    client.post("/track", content=b'{"event": "anonymous"}', headers=JSON_FROM_SITE)

    attempted = _deliver(settings, engine)

    assert attempted == 0
    assert fake_ac.requests == []
    assert events(engine)[0].status == "held"


def test_wrong_key_kept_for_later(
    client: TestClient, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "refused", "waiting")
    wrong_key = make_settings(database_url, fake_ac, MAPPER_AC_EVENT_KEY="wrong-key")

    _deliver(wrong_key, engine)

    refused, waiting = events(engine)
    assert (refused.status, refused.attempts, refused.refusals) == ("pending", 1, 0)
    assert refused.last_error and "key" in refused.last_error.lower()
    assert (waiting.attempts, waiting.next_attempt_at <= utcnow()) == (0, True)


@pytest.mark.parametrize("mode", ["down", "error", "html", "rate_limit"])
def test_delivery_retries_later(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC, mode: str
) -> None:
    _identified_events(client, fake_ac, "one", "two")
    fake_ac.set_mode(mode, retry_after=120)

    worker = _run_rounds(settings, engine)

    first, second = events(engine)
    assert (first.status, first.attempts, second.attempts) == ("pending", 1, 0)
    assert first.refusals == 0 and first.lease_until is None
    assert first.next_attempt_at > utcnow()
    assert second.lease_until is None
    assert worker.paused_until is not None and worker.paused_until > utcnow()


def test_delivery_honours_retry_after(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "limited")
    fake_ac.set_mode("rate_limit", retry_after=300)

    _deliver(settings, engine)

    wait = events(engine)[0].next_attempt_at - utcnow()
    assert timedelta(seconds=290) < wait <= timedelta(seconds=300)


def test_delivery_after_outage_delivers(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "survivor")
    fake_ac.set_mode("error")
    _deliver(settings, engine)
    fake_ac.set_mode("up")
    _due_now(engine)

    _deliver(settings, engine)

    assert events(engine)[0].status == "delivered"
    assert len(fake_ac.events()) == 1


def test_claim_due_leases_rows(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "leased")
    sessions = make_sessionmaker(engine)

    first = claim_due(sessions, limit=10, lease=60)
    second = claim_due(sessions, limit=10, lease=60)

    assert [claim.name for claim in first] == ["leased"]
    assert second == []


def test_claim_due_expired_lease_reclaimed(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "crashed")
    sessions = make_sessionmaker(engine)
    claim_due(sessions, limit=10, lease=60)
    with Session(engine) as session, session.begin():
        past = utcnow() - timedelta(seconds=1)
        session.execute(update(Event).values(lease_until=past))

    again = claim_due(sessions, limit=10, lease=60)

    assert [claim.name for claim in again] == ["crashed"]


def test_worker_without_credentials_logs_once(
    database_url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(database_url, None)

    async def run() -> None:
        client = ACClient(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(_worker(settings, engine, client).run(stop))
        await asyncio.sleep(0.3)
        stop.set()
        await task
        await client.aclose()

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())

    [record] = caplog.records
    assert "paused" in record.getMessage()


def test_worker_runs_until_stopped(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "looped")

    async def run() -> None:
        stop = asyncio.Event()
        ac = ACClient(settings)
        task = asyncio.create_task(_worker(settings, engine, ac).run(stop))
        for _ in range(100):
            if fake_ac.events():
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        await ac.aclose()

    asyncio.run(run())

    assert events(engine)[0].status == "delivered"


def test_backoff_grows_and_caps() -> None:
    delays = [
        compute_backoff(attempt, maximum=3600).total_seconds()
        for attempt in (1, 2, 5, 40)
    ]

    assert 1.6 <= delays[0] <= 2.4
    assert delays[0] < delays[1] < delays[2]
    assert delays[3] <= 3600 * 1.2


def _run_rounds(settings: Settings, engine: Engine, rounds: int = 1) -> DeliveryWorker:
    async def run(worker: DeliveryWorker) -> DeliveryWorker:
        for _ in range(rounds):
            await worker.deliver_round()
        return worker

    return _with_worker(settings, engine, run)


def test_worker_pauses_after_rate_limit(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "first", "second")
    fake_ac.set_mode("rate_limit", retry_after=60)

    worker = _run_rounds(settings, engine, rounds=3)

    assert len(fake_ac.requests) == 1
    assert worker.paused_until is not None
    assert (
        timedelta(seconds=55) < worker.paused_until - utcnow() <= timedelta(minutes=1)
    )


def test_round_stops_before_lease_ends(
    client: TestClient, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "first", "second")
    # A send needs its 3 s timeout and a 5 s margin left in the 9 s lease:
    # the first may start within 1 s of the claim, none after it took 1.5 s.
    fake_ac.set_mode("slow", delay=1.5)
    tight = make_settings(
        database_url, fake_ac, MAPPER_DELIVERY_LEASE="9", MAPPER_AC_TIMEOUT="3"
    )

    _run_rounds(tight, engine)

    first, second = events(engine)
    assert (first.status, second.status) == ("delivered", "pending")
    assert second.lease_token is None and second.attempts == 0


def test_round_sends_nothing_when_stopping(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "first")

    async def run() -> int:
        stop = asyncio.Event()
        stop.set()
        ac = ACClient(settings)
        worker = _worker(settings, engine, ac)
        await worker.run(stop)
        attempted = await worker.deliver_round()
        await ac.aclose()
        return attempted

    assert asyncio.run(run()) == 0
    assert fake_ac.requests == []
    assert events(engine)[0].lease_token is None


def test_record_result_lost_lease(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "contested")
    sessions = make_sessionmaker(engine)
    [stale] = claim_due(sessions, limit=10, lease=60)
    with Session(engine) as session, session.begin():
        session.execute(update(Event).values(lease_until=utcnow()))
    [fresh] = claim_due(sessions, limit=10, lease=60)

    late = DeliveryResult(Outcome.REFUSED, "late answer")
    with sessions.begin() as session:
        record_result(session, Attempt(stale, late), settings=settings)

    [event] = events(engine)
    assert (event.status, event.lease_token) == ("pending", fresh.lease_token)


def test_record_result_event_gone(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "erased")
    sessions = make_sessionmaker(engine)
    [claim] = claim_due(sessions, limit=10, lease=60)
    with Session(engine) as session, session.begin():
        session.query(Event).delete()

    delivered = DeliveryResult(Outcome.DELIVERED, "Spawned")
    with sessions.begin() as session:
        record_result(session, Attempt(claim, delivered), settings=settings)

    assert events(engine) == []


def test_worker_survives_failed_round(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # A database that cannot be opened fails every round.
    path = "/nonexistent/planted.person@example.com/x.db"
    unreachable = make_sessionmaker(make_engine(f"sqlite:///{path}"))

    async def run() -> None:
        stop = asyncio.Event()
        ac = ACClient(settings)
        worker = _worker(settings, unreachable, ac)
        task = asyncio.create_task(worker.run(stop))
        for _ in range(100):
            if "Delivery round failed" in caplog.text:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        await ac.aclose()

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())

    assert "Delivery round failed (OperationalError at" in caplog.text
    assert "planted.person" not in caplog.text


def test_worker_loop_waits_out_pause(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "first", "second")
    fake_ac.set_mode("rate_limit", retry_after=60)

    async def run_briefly() -> None:
        stop = asyncio.Event()
        ac = ACClient(settings)
        worker = _worker(settings, engine, ac)
        task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(0.5)
        stop.set()
        await task
        await ac.aclose()

    asyncio.run(run_briefly())

    assert len(fake_ac.requests) == 1


def test_send_bounded_by_timeout(
    client: TestClient, database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "slow")
    fake_ac.set_mode("slow", delay=3)
    impatient = make_settings(database_url, fake_ac, MAPPER_AC_TIMEOUT="0.3")

    _deliver(impatient, engine)

    [event] = events(engine)
    assert (event.status, event.last_error) == (
        "pending",
        "Network error: TimeoutError",
    )


def test_claim_due_concurrent_disjoint(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    add_visitors_with_events(sessions, visitors=40, each=1)
    barrier = threading.Barrier(4)
    claimed: list[list[int]] = []

    def claim() -> None:
        barrier.wait()
        batch = claim_due(sessions, limit=10, lease=60)
        claimed.append([c.event_id for c in batch])

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    every_id = [event_id for batch in claimed for event_id in batch]
    assert len(every_id) == len(set(every_id)) == 40


def test_outage_warned_once_per_run(
    client: TestClient,
    settings: Settings,
    engine: Engine,
    fake_ac: FakeAC,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _identified_events(client, fake_ac, "first")
    fake_ac.set_mode("error")

    async def two_failures(worker: DeliveryWorker) -> None:
        await worker.deliver_round()
        _due_now(engine)
        worker.paused_until = None
        await worker.deliver_round()

    with caplog.at_level(logging.WARNING):
        _with_worker(settings, engine, two_failures)

    assert len(fake_ac.requests) == 2
    assert caplog.text.count("AC is not taking events") == 1


def test_recovery_logged_once(
    client: TestClient,
    settings: Settings,
    engine: Engine,
    fake_ac: FakeAC,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _identified_events(client, fake_ac, "first", "second")
    fake_ac.set_mode("error")

    async def fail_then_recover(worker: DeliveryWorker) -> None:
        await worker.deliver_round()
        fake_ac.set_mode("up")
        _due_now(engine)
        worker.paused_until = None
        # The second event waits for the first: one per visitor each round.
        await worker.deliver_round()
        await worker.deliver_round()

    with caplog.at_level(logging.INFO, logger="mapper"):
        _with_worker(settings, engine, fail_then_recover)

    assert [e.status for e in events(engine)] == ["delivered", "delivered"]
    assert caplog.text.count("delivery resumes") == 1


def test_retry_after_zero_still_backs_off(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    _identified_events(client, fake_ac, "first", "second")
    fake_ac.set_mode("rate_limit", retry_after=0)

    worker = _run_rounds(settings, engine, rounds=5)

    assert len(fake_ac.requests) == 1
    assert worker.paused_until is not None
    assert worker.paused_until > utcnow() + timedelta(seconds=1)


def test_refused_event_dead_after_bounded_tries(
    database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    settings = make_settings(database_url, fake_ac, MAPPER_DELIVERY_MAX_REFUSALS="3")
    sessions = make_sessionmaker(engine)
    add_visitors_with_events(sessions, visitors=1, each=2)
    fake_ac.refuse_event("v0_0", "Contact v0@example.com may not be tracked.")

    for _ in range(3):
        _deliver(settings, engine)
        _due_now(engine)
    _deliver(settings, engine)

    dead, after = events(engine)
    assert (dead.status, dead.dead_reason, dead.refusals) == ("dead", "refused", 3)
    assert dead.last_error == "Contact v0@example.com may not be tracked."
    assert after.status == "delivered"
    assert [event["event"] for event in fake_ac.events()] == ["v0_1"]


def test_refusal_backs_off_event_not_worker(
    settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    sessions = make_sessionmaker(engine)
    add_visitors_with_events(sessions, visitors=2, each=1)
    fake_ac.refuse_event("v0_0", "No.")

    worker = _run_rounds(settings, engine)

    refused, other = events(engine)
    assert refused.status == "pending" and refused.next_attempt_at > utcnow()
    assert other.status == "delivered"
    assert worker.paused_until is None


def test_wrong_key_stops_delivery_once(
    database_url: str,
    engine: Engine,
    fake_ac: FakeAC,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong_key = make_settings(
        database_url,
        fake_ac,
        MAPPER_AC_EVENT_KEY="wrong-key",
        MAPPER_DELIVERY_CONCURRENCY="1",
    )
    add_visitors_with_events(make_sessionmaker(engine), visitors=5, each=1)

    async def refused_then_probed(worker: DeliveryWorker) -> DeliveryWorker:
        await worker.deliver_round()
        paused = worker.paused_until
        worker.paused_until = None
        await worker.deliver_round()
        worker.paused_until = paused
        return worker

    with caplog.at_level(logging.WARNING):
        worker = _with_worker(wrong_key, engine, refused_then_probed)

    stored = events(engine)
    assert all(event.status == "pending" for event in stored)
    assert all(event.refusals == 0 for event in stored)
    # The first refusal stops the round; the probe tries the same event.
    assert [event.attempts for event in stored] == [2, 0, 0, 0, 0]
    assert caplog.text.count("refused the event tracking settings") == 1
    assert wrong_key.ac_event_key and str(wrong_key.ac_event_key) not in caplog.text
    assert worker.paused_until is not None
    assert worker.paused_until > utcnow() + timedelta(minutes=59)


def test_fixed_settings_resume_logged(
    settings: Settings,
    engine: Engine,
    fake_ac: FakeAC,
    caplog: pytest.LogCaptureFixture,
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=2, each=1)
    configured_key = fake_ac.event_key

    async def refused_then_fixed(worker: DeliveryWorker) -> None:
        fake_ac.event_key = "a-key-mapper-does-not-have"
        await worker.deliver_round()
        fake_ac.event_key = configured_key
        worker.paused_until = None
        _due_now(engine)
        await worker.deliver_round()
        await worker.deliver_round()

    with caplog.at_level(logging.INFO, logger="mapper"):
        _with_worker(settings, engine, refused_then_fixed)

    assert [event.status for event in events(engine)] == ["delivered", "delivered"]
    assert caplog.text.count("delivery resumes") == 1


def test_visitor_order_kept_across_retries(
    settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=3, each=4)
    fake_ac.refuse_event("v1_1", "Not now.")
    for _ in range(2):
        _due_now(engine)
        _deliver(settings, engine)

    fake_ac.refuse_event("v1_1", None)
    for _ in range(4):
        _due_now(engine)
        _deliver(settings, engine)

    sent = [event["event"] for event in fake_ac.events()]
    assert len(sent) == 12
    for visitor in range(3):
        mine = [name for name in sent if name.startswith(f"v{visitor}_")]
        assert mine == [f"v{visitor}_{n}" for n in range(4)]


def test_round_sends_for_visitors_concurrently(
    database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    fake_ac.set_mode("slow", delay=0.3)
    settings = make_settings(
        database_url,
        fake_ac,
        MAPPER_DELIVERY_CONCURRENCY="5",
        MAPPER_AC_RATE_LIMIT="1000",
    )
    add_visitors_with_events(make_sessionmaker(engine), visitors=5, each=1)

    attempted = _deliver(settings, engine)

    assert attempted == 5
    assert all(event.status == "delivered" for event in events(engine))
    assert fake_ac.most_in_flight == 5


def test_expired_held_events_dropped(
    client: TestClient, settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    for name in ("old", "new"):
        client.post("/track", content=f'{{"event": "{name}"}}', headers=JSON_FROM_SITE)
    week_ago = utcnow() - timedelta(days=7, seconds=1)
    with Session(engine) as session, session.begin():
        session.execute(
            update(Event).where(Event.name == "old").values(received_at=week_ago)
        )

    dropped = expire_held(make_sessionmaker(engine), ttl=settings.held_event_ttl)

    assert dropped == 1
    assert [event.name for event in events(engine)] == ["new"]


def test_worker_counts_in_metrics(
    settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    sessions = make_sessionmaker(engine)
    add_visitors_with_events(sessions, visitors=3, each=1)
    fake_ac.refuse_event("v1_0", "No.")
    metrics = Metrics(sessions)

    async def one_round() -> None:
        ac = ACClient(settings)
        worker = DeliveryWorker(settings, sessions=sessions, client=ac, metrics=metrics)
        await worker.deliver_round()
        await ac.aclose()

    asyncio.run(one_round())

    text = metrics.render().decode()

    assert "mapper_events_delivered_total 2.0" in text
    assert 'mapper_event_retries_total{outcome="refused"} 1.0' in text
    assert "mapper_delivery_latency_seconds_count 2.0" in text
    assert 'mapper_outbox_events{status="pending"} 1.0' in text


def test_client_sends_nothing_during_pause(settings: Settings, fake_ac: FakeAC) -> None:
    fake_ac.set_mode("rate_limit", retry_after=60)

    async def two_sends() -> list[DeliveryResult]:
        ac = ACClient(settings)
        results = [
            await ac.send_event(email=EMAIL, name="limited", data=None)
            for _ in range(2)
        ]
        await ac.aclose()
        return results

    limited, paused = asyncio.run(two_sends())

    assert len(fake_ac.requests) == 1
    assert paused.outcome is Outcome.RETRY
    assert paused.retry_at == limited.retry_at


def test_lost_lease_outcome_not_counted(
    settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    sessions = make_sessionmaker(engine)
    add_visitors_with_events(sessions, visitors=1, each=1)
    fake_ac.set_mode("slow", delay=0.5)
    metrics = Metrics(sessions)

    async def round_losing_lease() -> None:
        ac = ACClient(settings)
        worker = DeliveryWorker(settings, sessions=sessions, client=ac, metrics=metrics)
        sending = asyncio.create_task(worker.deliver_round())
        while not fake_ac.in_flight:
            await asyncio.sleep(0.01)
        # As if the lease had run out and another worker had taken it.
        with Session(engine) as session, session.begin():
            session.execute(update(Event).values(lease_token="taken-by-another"))
        await sending
        await ac.aclose()

    asyncio.run(round_losing_lease())

    assert "mapper_events_delivered_total 0.0" in metrics.render().decode()
    assert events(engine)[0].status == "pending"


def test_failures_together_back_off_one_step(
    database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    fake_ac.set_mode("slow", delay=2)
    impatient = make_settings(
        database_url,
        fake_ac,
        MAPPER_AC_TIMEOUT="0.3",
        MAPPER_DELIVERY_CONCURRENCY="5",
        MAPPER_AC_RATE_LIMIT="1000",
    )
    add_visitors_with_events(make_sessionmaker(engine), visitors=5, each=1)

    worker = _run_rounds(impatient, engine)

    assert sum(event.attempts for event in events(engine)) == 5
    # One failure: the first step of backoff, 2 s and its 20 % jitter.
    assert worker.paused_until is not None
    assert worker.paused_until < utcnow() + timedelta(seconds=2.4)


def test_failed_store_leaves_other_sends_alone(
    settings: Settings, engine: Engine, fake_ac: FakeAC
) -> None:
    sessions = make_sessionmaker(engine)
    add_visitors_with_events(sessions, visitors=1, each=1)
    fake_ac.set_mode("slow", delay=0.5)

    async def round_with_table_gone() -> int:
        ac = ACClient(settings)
        sending = asyncio.create_task(_worker(settings, sessions, ac).deliver_round())
        while not fake_ac.in_flight:
            await asyncio.sleep(0.01)
        with Session(engine) as session, session.begin():
            session.execute(text("ALTER TABLE events RENAME TO events_away"))
        try:
            return await sending
        finally:
            with Session(engine) as session, session.begin():
                session.execute(text("ALTER TABLE events_away RENAME TO events"))
            await ac.aclose()

    assert asyncio.run(round_with_table_gone()) == 1
    [event] = events(engine)
    # Sent, but not recorded: the lease is left to run out.
    assert (event.status, event.lease_token is not None) == ("pending", True)
    assert len(fake_ac.events()) == 1


def test_failures_together_keep_longest_retry_after(
    database_url: str, engine: Engine, fake_ac: FakeAC
) -> None:
    fake_ac.set_mode("rate_limit", delay=0.3, retry_after=60)
    settings = make_settings(
        database_url,
        fake_ac,
        MAPPER_DELIVERY_CONCURRENCY="2",
        MAPPER_AC_RATE_LIMIT="1000",
    )
    add_visitors_with_events(make_sessionmaker(engine), visitors=2, each=1)

    worker = _run_rounds(settings, engine)

    assert fake_ac.most_in_flight == 2
    assert worker.paused_until is not None
    assert worker.paused_until > utcnow() + timedelta(seconds=55)
