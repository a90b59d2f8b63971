"""Group commit: items of concurrent callers share a transaction, each
caller hears its own result once it is committed, and one item's failure
is its caller's alone."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from mapper.batching import WriteBatcher
from mapper.db import make_sessionmaker
from mapper.models import Visitor
from tests.helpers import wait_until


class VisitorWriter:
    """Stores one visitor per item, named by it; remembers how many items
    each transaction was given.

    It refuses names starting with "bad", fails as a database does on names
    starting with "down", and takes its time over names starting with
    "slow".
    """

    def __init__(self) -> None:
        self.transactions: list[int] = []

    def __call__(self, session: Session, names: list[str]) -> list[int]:
        self.transactions.append(len(names))
        stored = []
        for name in names:
            if name.startswith("bad"):
                raise ValueError("Refused.")
            if name.startswith("down"):
                raise OperationalError("INSERT", {}, Exception("disk I/O error"))
            if name.startswith("slow"):
                time.sleep(0.2)
            visitor = Visitor(public_id=name)
            session.add(visitor)
            session.flush()
            stored.append(visitor.id)
        return stored


def stored_names(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(Visitor.public_id).order_by(Visitor.id)))


async def submit_all(batcher: WriteBatcher[str, int], names: list[str]) -> list[object]:
    calls = (batcher.submit(name) for name in names)
    return await asyncio.gather(*calls, return_exceptions=True)


def test_batcher_shares_one_transaction(engine: Engine) -> None:
    writer = VisitorWriter()
    batcher = WriteBatcher(make_sessionmaker(engine), writer)
    names = [f"visitor-{n}" for n in range(5)]

    results = asyncio.run(submit_all(batcher, names))

    assert writer.transactions == [5]
    assert stored_names(engine) == names
    # Row ids rise in the callers' order.
    assert results == sorted(result for result in results if isinstance(result, int))


def test_batcher_failure_stays_alone(engine: Engine) -> None:
    writer = VisitorWriter()
    batcher = WriteBatcher(make_sessionmaker(engine), writer)

    results = asyncio.run(submit_all(batcher, ["first", "bad-one", "last"]))

    assert isinstance(results[1], ValueError)
    assert stored_names(engine) == ["first", "last"]
    assert writer.transactions == [3, 1, 1, 1]


def test_batcher_caps_batch_size(engine: Engine) -> None:
    writer = VisitorWriter()
    batcher = WriteBatcher(make_sessionmaker(engine), writer, most=2)

    asyncio.run(submit_all(batcher, [f"visitor-{n}" for n in range(5)]))

    assert writer.transactions == [2, 2, 1]


def test_batcher_miscount_fails(engine: Engine) -> None:
    def store_none(session: Session, names: list[str]) -> list[int]:
        session.add(Visitor(public_id=names[0]))
        return []

    batcher = WriteBatcher(make_sessionmaker(engine), store_none)

    with pytest.raises(RuntimeError, match="Expected 1 results, one per item; got 0"):
        asyncio.run(batcher.submit("visitor"))
    assert stored_names(engine) == []


def test_batcher_stores_for_leavers(engine: Engine) -> None:
    writer = VisitorWriter()
    batcher = WriteBatcher(make_sessionmaker(engine), writer)

    async def leave_early() -> int:
        gone = asyncio.ensure_future(batcher.submit("gone"))
        staying = asyncio.ensure_future(batcher.submit("staying"))
        await asyncio.sleep(0)
        gone.cancel()
        return await staying

    asyncio.run(leave_early())

    # Once queued, an item is stored even if its caller stops listening.
    assert stored_names(engine) == ["gone", "staying"]


def test_batcher_database_failure_fails_all(engine: Engine) -> None:
    writer = VisitorWriter()
    batcher = WriteBatcher(make_sessionmaker(engine), writer)

    results = asyncio.run(submit_all(batcher, ["first", "down-now", "last"]))

    assert all(isinstance(result, OperationalError) for result in results)
    assert writer.transactions == [3]


def test_batcher_outlives_closed_loop(engine: Engine) -> None:
    batcher = WriteBatcher(make_sessionmaker(engine), VisitorWriter())

    async def leave_while_storing() -> None:
        asyncio.ensure_future(batcher.submit("slow-first"))
        await asyncio.sleep(0.05)

    asyncio.run(leave_while_storing())
    second = asyncio.run(batcher.submit("second"))

    assert isinstance(second, int)
    # The abandoned transaction still ends, in its own thread.
    wait_until(lambda: "slow-first" in stored_names(engine), seconds=10)
    assert "second" in stored_names(engine)
