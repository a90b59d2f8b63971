"""Group commit: items of concurrent callers share a transaction, each
caller hears its own result once it is committed, and one item's failure
is its caller's alone."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mapper.batching import WriteBatcher
from mapper.db import make_sessionmaker
from mapper.models import Visitor


class VisitorWriter:
    """Stores one visitor per item, named by it, and refuses names starting
    with "bad"; remembers how many items each transaction was given."""

    def __init__(self) -> None:
        self.transactions: list[int] = []

    def __call__(self, session: Session, names: list[str]) -> list[int]:
        self.transactions.append(len(names))
        stored = []
        for name in names:
            if name.startswith("bad"):
                raise ValueError("Refused.")
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


def test_batcher_failure_stays_with_its_item(engine: Engine) -> None:
    writer = VisitorWriter()
    batcher = WriteBatcher(make_sessionmaker(engine), writer)

    results = asyncio.run(submit_all(batcher, ["first", "bad-one", "last"]))

    assert isinstance(results[1], ValueError)
    assert stored_names(engine) == ["first", "last"]
    assert writer.transactions == [3, 1, 1, 1]


def test_batcher_caps_items_per_transaction(engine: Engine) -> None:
    writer = VisitorWriter()
    batcher = WriteBatcher(make_sessionmaker(engine), writer, most=2)

    asyncio.run(submit_all(batcher, [f"visitor-{n}" for n in range(5)]))

    assert writer.transactions == [2, 2, 1]


def test_batcher_miscount_is_an_error(engine: Engine) -> None:
    def store_none(session: Session, names: list[str]) -> list[int]:
        session.add(Visitor(public_id=names[0]))
        return []

    batcher = WriteBatcher(make_sessionmaker(engine), store_none)

    with pytest.raises(RuntimeError, match="one result per item"):
        asyncio.run(batcher.submit("visitor"))
    assert stored_names(engine) == []


def test_batcher_caller_gone_still_stores(engine: Engine) -> None:
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
